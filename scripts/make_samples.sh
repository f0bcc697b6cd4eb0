#!/bin/sh
# Regenerate the sample traces in traces/ exactly (tests/test_synth.py checks that they match).
# Run from anywhere with upmtrace installed: sh scripts/make_samples.sh
set -eu
cd "$(dirname "$0")/.."
upmtrace synth snp-boot --memory 1G --vcpus 4 --seed 0 -o traces/snp-boot-1g.parquet
upmtrace synth lazy-accept --memory 1G --vcpus 4 --seed 0 -o traces/lazy-accept-1g.parquet
upmtrace synth dma-churn --memory 1G --vcpus 4 --seed 0 -o traces/dma-churn-1g.parquet
upmtrace synth tdx-boot --memory 1G --vcpus 4 --seed 0 -o traces/tdx-boot-1g.parquet
upmtrace synth implicit --memory 1G --vcpus 4 --seed 0 -o traces/implicit-1g.parquet
