#!/usr/bin/env bash
# The GPU results, in parts of about five minutes each on one large GPU (run from the repository's
# root, with the package importable):
#
#   bash scripts/gpu_run.sh bench OUT       the benchmark's gpu workload (bfloat16, n up to 65536)
#   bash scripts/gpu_run.sh timeseries OUT  the timeseries workload on the GPU (float32)
#   bash scripts/gpu_run.sh ablations OUT   the ablation grid's 'gpu' preset, 12 workers sharing the
#                                           GPU, no run started after 4 minutes; a second call with
#                                           the same OUT resumes it
#
# Each part writes its results (and the output it printed, as OUT/<part>.log) under OUT.
# Publish the ablations with `python -m deform_attn.experiments publish --preset gpu ...`; copy
# a benchmark folder into deform_attn/data/bench/ with a README naming the GPU.
set -euo pipefail

usage="usage: bash scripts/gpu_run.sh {bench|timeseries|ablations} OUT"
part=${1:?$usage}
out=${2:?$usage}
python=${PYTHON:-python}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "scripts/gpu_run.sh: torch sees no CUDA device here; these parts are for a GPU" >&2
    exit 2
fi
mkdir -p "$out"
"$python" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' | tee "$out/$part.log"

case "$part" in
    bench)
        "$python" -m deform_attn.bench --workload gpu --device cuda --out "$out/bench-gpu" \
            --note "gpu workload on $(hostname)" 2>&1 | tee -a "$out/$part.log"
        ;;
    timeseries)
        "$python" -m deform_attn.bench --workload timeseries --device cuda --out "$out/bench-timeseries" \
            --note "timeseries workload on the GPU of $(hostname)" 2>&1 | tee -a "$out/$part.log"
        ;;
    ablations)
        "$python" -m deform_attn.experiments run --preset gpu --jobs 12 --device cuda --time-limit 240 \
            --out "$out/gpu.jsonl" --quiet 2>&1 | tee -a "$out/$part.log"
        ;;
    *)
        echo "$usage" >&2
        exit 2
        ;;
esac
