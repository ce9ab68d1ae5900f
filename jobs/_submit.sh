#!/usr/bin/env bash
# Shared body of the job entries (jobs/prepare.sh, pretrain.sh, finetune.sh, tune.sh):
#
#   ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env jobs/runtime_env.yaml \
#       --submission-id raymim-<task>-<timestamp> -- raymim <task> "$@"
#
# run from the repository root with token authentication on (RAY_AUTH_MODE=token, the cluster's
# token in ~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN).
#
# Storage and tracking are never written into the job: the cluster's nodes define RAYMIM_STORAGE
# and MLFLOW_TRACKING_URI (see cluster/README.md). When the submitting shell sets them (or
# RAYMIM_HOME / RAYMIM_THREADS), they are added to jobs/runtime_env.yaml's env_vars for this job
# only, and take precedence over the nodes' values.
#
# Environment: RAY_ADDRESS (required: http://HEAD:8265, e.g. through `ray dashboard cluster/aws.yaml`
# or `kubectl port-forward`), RAYMIM_SUBMISSION_ID (default raymim-<task>-<UTC timestamp>),
# RAYMIM_SUBMIT_ARGS (extra `ray job submit` flags, e.g. "--no-wait").
set -euo pipefail

task="$1"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job-submission address of the cluster, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
RAY="${RAY_BIN:-ray}"
PY="${PYTHON:-$(dirname "$(command -v "$RAY")")/python}"
[[ -x "$PY" ]] || PY=python3

sid="${RAYMIM_SUBMISSION_ID:-raymim-$task-$(date -u +%Y%m%d-%H%M%S)}"
forward=(RAYMIM_STORAGE MLFLOW_TRACKING_URI RAYMIM_HOME RAYMIM_THREADS)
runtime_env=(--runtime-env "$here/runtime_env.yaml")
for var in "${forward[@]}"; do
  if [[ -n "${!var:-}" ]]; then
    # Same file plus the submitting shell's values: `ray job submit` takes one of --runtime-env
    # and --runtime-env-json, so merge them here.
    json="$("$PY" - "$here/runtime_env.yaml" "${forward[@]}" <<'PYEOF'
import json, os, sys
import yaml
env = yaml.safe_load(open(sys.argv[1])) or {}
env.setdefault("env_vars", {}).update({k: os.environ[k] for k in sys.argv[2:] if os.environ.get(k)})
print(json.dumps(env))
PYEOF
)"
    runtime_env=(--runtime-env-json "$json")
    break
  fi
done

cd "$root"
# shellcheck disable=SC2086
exec "$RAY" job submit --address "$RAY_ADDRESS" --submission-id "$sid" --working-dir . \
  "${runtime_env[@]}" ${RAYMIM_SUBMIT_ARGS:-} -- raymim "$task" "$@"
