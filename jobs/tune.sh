#!/usr/bin/env bash
# Submit `raymim tune` (Ray Tune sweep; every trial a Ray Train run scored downstream). Tune's
# experiment state and the trials' checkpoints go to $RAYMIM_STORAGE, so re-submitting the same
# sweep name resumes the unfinished trials.
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/tune.sh --config jobs/configs/mim.yaml ...
# (`raymim tune --help` lists its options.)
exec "$(dirname "${BASH_SOURCE[0]}")/_submit.sh" tune "$@"
