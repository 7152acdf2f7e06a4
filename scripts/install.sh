#!/usr/bin/env bash
# Creates the virtualenv and installs raylm with the versions pinned in constraints.txt.
# Order matters: torch first (pip then takes the CPU build lying on this disk, not a multi-GB CUDA build),
# then DeepSpeed without build isolation (so its setup sees the installed torch), then the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP="$VENV/bin/pip --disable-pip-version-check -q"
step() { printf '\n[install] %s\n' "$*"; }

[ -x "$VENV/bin/python" ] || { step "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
step "pip, setuptools, wheel"
$PIP install -U -c constraints.txt pip setuptools wheel
step "torch (CPU build on this machine; on GPU machines set TORCH_SPEC, e.g. TORCH_SPEC='torch==2.13.0')"
$PIP install -c constraints.txt "${TORCH_SPEC:-torch}"
step "deepspeed (no build isolation: its setup must see torch)"
$PIP install -c constraints.txt --no-build-isolation deepspeed
step "raylm and its dependencies (editable, with the dev extra)"
$PIP install -c constraints.txt -e '.[dev]'
step "done: $("$VENV/bin/python" -c 'import torch, deepspeed, ray, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "ray", ray.__version__, "transformers", transformers.__version__)')"
