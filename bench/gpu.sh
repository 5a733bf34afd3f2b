#!/usr/bin/env bash
# GPU benchmark of the AFA training iteration, VOC recipe (issue 14, item 4); see bench/gpu.py for what it prints.
#
#   bash bench/gpu.sh                         # CUDA: bf16 / fp32, eager / torch.compile, pseudo-label check (~5 min)
#   bash bench/gpu.sh --quick                 # CUDA: fewer iterations, no torch.compile
#   bash bench/gpu.sh --device cpu --quick    # CPU test run (mit_tiny, crop 128)
#
# Any other argument goes to bench/gpu.py (python3 bench/gpu.py --help). PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" bench/gpu.py "$@"
