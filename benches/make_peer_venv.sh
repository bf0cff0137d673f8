#!/usr/bin/env bash
# Creates the virtual environment that holds the peers we compare against (mergekit, peft), kept
# apart from ours so their pins never constrain umerge. Parity tests and benchmarks find it at
# $UMERGE_PEERS (default .venv-peers). Safe to rerun: does nothing when it is already complete.
set -euo pipefail
dir=${1:-${UMERGE_PEERS:-.venv-peers}}
if [ -x "$dir/bin/mergekit-yaml" ] && "$dir/bin/python" -c "import mergekit, peft" 2>/dev/null; then
    echo "peer venv ready: $dir"
    exit 0
fi
python3 -m venv "$dir"
"$dir/bin/pip" install -q --upgrade pip
"$dir/bin/pip" install -q "mergekit==0.1.5" peft numpy
"$dir/bin/python" -c "import mergekit, peft; print('peer venv ready:', '$dir', 'peft', peft.__version__)"
