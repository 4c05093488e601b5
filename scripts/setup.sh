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
python -c "from smolvlm.processing import resample; resample.load()"  # and the C++ image resize (~10 s, same cache)
# The browser tests (tests/serving/test_ui.py) drive Debian's chromium through Playwright (never `playwright install`:
# it downloads browsers). Without apt-get, say so: those tests then fail, naming what is missing.
if ! command -v chromium >/dev/null; then
    if command -v apt-get >/dev/null; then
        sudo=$([ "$(id -u)" = 0 ] || echo sudo)
        $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
        echo "setup.sh: no chromium and no apt-get to install it: tests/serving/test_ui.py will fail" >&2
    fi
fi
