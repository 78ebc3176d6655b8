#!/usr/bin/env bash
# Sets up bbct and runs its main job on the embedded default: prepares the real data and
# models (cached in $BBCT_HOME, else ~/.cache/bbct; a no-op once done), then writes the float
# golden of the prepared RT sentiment classifier for two sentences to artifacts/golden/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python3 -m pip install -q -e '.[prepare]'
python3 -m simulator.cli prepare "$@"
python3 -m simulator.cli golden \
    --text "A gripping, beautifully acted drama." \
    --text "Dull, overlong and never funny." \
    --out artifacts/golden
