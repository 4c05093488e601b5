#!/usr/bin/env bash
# The main job: sets up (scripts/setup.sh), then asks SmolVLM about an image (scripts/demo.py; pass --image PATH,
# --model FOLDER_OR_REPO_ID, --prompt TEXT).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/demo.py "$@"
