#!/usr/bin/env bash
# Creates .venv and installs smolvlm with the exact versions CI uses (constraints.txt).
# The pinned CPU torch goes in first: an unpinned torch requirement on a machine without torch
# would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
python -c "from smolvlm.model import kernels; kernels.build()"  # builds the C++ CPU kernels once (~30 s; cached in ~/.cache/smolvlm)
