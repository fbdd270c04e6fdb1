#!/usr/bin/env bash
# One prepared GPU check, within 10 minutes on a single GPU: FedAMoLE and FedIT-FT on configs/fedamole/rg-task.toml
# (10 clients, 10 rounds) and FedMoE on the upcycled SmolLM2, the frozen backbone in bfloat16. Writes tokens/s, peak
# GPU memory, round times and scores to OUT (default: gpu-scale-out). `--dry-run` checks it on the CPU with tiny
# models. It uses the project's environment (`make install`; on a GPU machine install a CUDA build of torch 2.13.0).
#   bash benchmarks/gpu_scale.sh [OUT] [--dry-run] [--only fedamole,fedit-ft,fedmoe]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="gpu-scale-out"
if [[ $# -gt 0 && "$1" != --* ]]; then OUT="$1"; shift; fi
export FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
PY="${PYTHON:-.venv/bin/python}"
if [[ " $* " != *" --dry-run "* ]]; then
    "$PY" -m fedhmoe prepare-model >/dev/null   # the one-time SmolLM2 conversion, outside the timings
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        > /dev/stderr || true
fi
exec "$PY" benchmarks/gpu_scale.py "$OUT" "$@"
