#!/usr/bin/env bash
# Run an evaluation protocol and keep its table beside the results.
#
#   scripts/run_protocol.sh [PROTOCOL] [extra tmu-admin evaluate options...]
#
# PROTOCOL defaults to cpu-small. Results go to runs/<PROTOCOL>/ (results.txt/.json/.csv/.png, run.log);
# trained models are cached in $TMU_EVAL_CACHE (default /tmp/tmu-cache) and reused by later runs.
set -euo pipefail

cd "$(dirname "$0")/.."
protocol="${1:-cpu-small}"
shift || true
out="runs/${protocol}"
mkdir -p "${out}"
# Two cores: one intra-op thread pool of two, no oversubscription from OpenMP.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
start=$(date +%s)
.venv/bin/tmu-admin -v evaluate --protocol "${protocol}" --out "${out}" \
    --cache-dir "${TMU_EVAL_CACHE:-/tmp/tmu-cache}" "$@" 2> "${out}/run.log"
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "${out}/run.log"
