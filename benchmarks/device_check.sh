#!/usr/bin/env bash
# Issue #6 GPU check (one NVIDIA H200): jaxkd KD step vs the PyTorch peer, f32/bf16, batch 64/256/1024.
# Writes device_check.{md,json,log} to $OUT (the device machine's output folder) if set, else
# benchmarks/results/. Extra arguments go to device_check.py. Whole run < 8 min (budget 420 s + grace).
cd "$(dirname "$0")/.." && out="${OUT:-benchmarks/results}" && mkdir -p "$out" && set -o pipefail && XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 timeout -k 10 470 "${PYTHON:-python3}" benchmarks/device_check.py --budget-s 420 --json-out "$out/device_check.json" --md-out "$out/device_check.md" "$@" 2>&1 | tee "$out/device_check.log"
