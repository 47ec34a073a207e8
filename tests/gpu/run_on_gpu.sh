#!/usr/bin/env bash
# The GPU checks in one command, on a machine with one CUDA GPU, Python >= 3.10 and pip:
#
#   bash tests/gpu/run_on_gpu.sh              # installs, then runs tests/gpu (under 10 minutes)
#
# What it installs, into a virtual environment .venv-gpu (GPU_VENV=<path> to use another, already
# set up, or SKIP_INSTALL=1 to use the current Python as it is):
#   the project with its `gpu` and `dev` extras: vllm==0.32.0, which pins torch==2.13.0 (the CUDA
#   build, replacing another torch in that environment), ray, deepspeed, transformers, peft,
#   pytest; from PyPI, or offline from a directory of wheels with WHEELS=<dir> (pip --no-index).
# What it runs: tests/gpu with a missing GPU or vllm as an error, not a skip (GPU_TESTS_REQUIRED=1):
# vLLM's GPU engine, weight sync into it from a DeepSpeed learner on CUDA, the debug run, the shipped
# gsm8k config on one GPU (bf16, tied head, ZeRO-3, gradient checkpointing) with vLLM's head in
# float32 and in bf16, and the learner probe under ZeRO-3 on CUDA. The `[gpu]` lines it prints are
# the figures to record (behavior_logp_gap in bf16), with the GPU's name.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  venv=${GPU_VENV:-.venv-gpu}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  pip_args=(--quiet)
  [ -n "${WHEELS:-}" ] && pip_args+=(--no-index --find-links "$WHEELS")
  "$venv/bin/python" -m pip install "${pip_args[@]}" -e '.[dev,gpu]'
  PY=$venv/bin/python
else
  PY=${PYTHON:-python3}
fi

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print(f"[gpu] device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
export GPU_TESTS_REQUIRED=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 600 "$PY" -m pytest tests/gpu -q -s -p no:cacheprovider --timeout 560 --durations=10
