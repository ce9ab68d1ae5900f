#!/usr/bin/env bash
# Submit `raymim pretrain` (Ray Train). Give a fixed --name: checkpoints live under
# $RAYMIM_STORAGE/<name>/ (a path every node reaches), so submitting the same command again -
# after a stop, a lost node or a preempted spot/preemptible GPU - resumes from the latest
# checkpoint and continues the same MLflow run instead of starting over.
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/pretrain.sh --config jobs/configs/mim.yaml \
#       --data s3://bucket/shards/ct-192 --name mim-ct10k
exec "$(dirname "${BASH_SOURCE[0]}")/_submit.sh" pretrain "$@"
