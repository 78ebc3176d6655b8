#!/usr/bin/env bash
# Sets up bbct and runs its main job on the embedded default: prepares the real data and
# models (cached in $BBCT_HOME, else ~/.cache/bbct; a no-op once done), prints the layer-by-
# layer comparison of the integer simulation with the float golden for one sentence, then
# evaluates the prepared RT sentiment classifier in integers (w8a8 and the BBCT-like w4a8
# preset) on the whole held-out test split against float, writing artifacts/eval-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python3 -m pip install -q -e '.[prepare]'
python3 -m bbct prepare "$@"
python3 -m bbct run --config w4a8 --text "A gripping, beautifully acted drama." \
    --json artifacts/run-w4a8.json
for preset in w8a8 w4a8; do
    python3 -m bbct eval --config "$preset" --json "artifacts/eval-$preset.json"
done
