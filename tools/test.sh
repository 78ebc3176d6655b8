#!/usr/bin/env bash
# Sets up bbct with its test and prepare extras and runs the test suite. Tests that need the
# real MiniLM encoder (marked slow) prepare the data and encoder once into a temporary cache
# (about 15 s) unless $BBCT_HOME (else ~/.cache/bbct) already holds them; nothing fine-tunes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
# the RTL testbench tests simulate the example RTL with Icarus Verilog (a Debian package)
if ! command -v iverilog >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -q && apt-get install -y -q iverilog
    else
        echo "tools/test.sh: iverilog not found (apt-get install iverilog); the RTL tests will be skipped" >&2
    fi
fi
python3 -m pip install -q -e '.[test,prepare]'
python3 -m pytest "$@"
