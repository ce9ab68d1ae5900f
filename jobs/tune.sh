#!/usr/bin/env bash
# Submit `raymim tune` (Ray Tune sweep; every trial a Ray Train run scored downstream). Tune's
# experiment state and the trials' checkpoints go to $RAYMIM_STORAGE (or --storage), so the same
# command with the same --name plus --resume continues an interrupted sweep.
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/tune.sh --config jobs/configs/tune-mim.yaml \
#       --data /mnt/raymim/shards/ct-192 --labelled /mnt/raymim/btcv/dataset.json --name mim-sweep1
# (`raymim tune --help` lists its options.)
exec "$(dirname "${BASH_SOURCE[0]}")/_submit.sh" tune "$@"
