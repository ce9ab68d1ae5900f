#!/usr/bin/env bash
# Submit `raymim prepare` (Ray Data: scans -> de-identified crops in Parquet shards).
# --input and --out must be paths every node can read / write (a bucket or a shared file system).
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/prepare.sh --input s3://bucket/ct/manifest.csv \
#       --out s3://bucket/shards/ct-96 --config jobs/configs/mae.yaml
# Re-submitting with the same --out and config skips the cases already written.
exec "$(dirname "${BASH_SOURCE[0]}")/_submit.sh" prepare "$@"
