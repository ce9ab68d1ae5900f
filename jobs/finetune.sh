#!/usr/bin/env bash
# Submit `raymim finetune` (downstream segmentation on label fractions vs. scratch); the
# encoder checkpoint and the labelled set must be on storage every node reaches.
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/finetune.sh --config jobs/configs/mim.yaml ...
# (`raymim finetune --help` lists its options.)
exec "$(dirname "${BASH_SOURCE[0]}")/_submit.sh" finetune "$@"
