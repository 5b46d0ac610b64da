#!/usr/bin/env bash
# The GPU check, one command, under five minutes: the CUDA tests (tests/test_cuda.py: no host sync per
# micro-batch, one per step, the abort on CUDA) and, where two or more GPUs are visible, the 2-GPU
# DataParallel and DDP/NCCL tests (tests/test_multi_gpu.py). Prints the skip reasons; exit 0 only if every
# test that could run passed. Exit 2 when no CUDA device is visible (nothing was checked).
#   bash scripts/gpu_check.sh            # uses .venv/bin/python (PYTHON=... to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever the venv has installed
n=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
"$PY" -c "import torch; print('== torch', torch.__version__, 'CUDA', torch.version.cuda, 'devices:',
[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
if [ "$n" -lt 1 ]; then
  echo "== no CUDA device visible: nothing checked"
  exit 2
fi
[ "$n" -ge 2 ] || echo "== one CUDA device: the 2-GPU DataParallel and DDP tests will be skipped (still unproven)"
start=$(date +%s)
timeout 290 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_multi_gpu.py "$@"
echo "== GPU check passed in $(( $(date +%s) - start )) s"
