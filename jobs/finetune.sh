#!/usr/bin/env bash
# Submit `raymim finetune` (downstream segmentation at label fractions, pretrained vs. scratch);
# the encoder (a checkpoint path on shared storage, or runs:/<run_id>/encoder from MLflow) and
# the labelled set must be reachable from every node.
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/finetune.sh --config jobs/configs/mim.yaml \
#       --pretrained runs:/<run_id>/encoder --data /mnt/raymim/btcv/dataset.json --fractions 0.05,0.1,1.0
# (`raymim finetune --help` lists its options.)
exec "$(dirname "${BASH_SOURCE[0]}")/_submit.sh" finetune "$@"
