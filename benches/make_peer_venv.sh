#!/usr/bin/env bash
# Creates the virtual environment that holds the peers we compare against (mergekit, peft), kept
# apart from ours so their pins never constrain umerge. Parity tests and benchmarks find it at
# $UMERGE_PEERS (default .venv-peers). Safe to rerun: does nothing when it is already complete with
# exactly these versions, and reinstalls the pins into it when any version differs.
set -euo pipefail
dir=${1:-${UMERGE_PEERS:-.venv-peers}}

# The exact versions the parity tests and the README's comparisons are measured against. Change them
# together, rerun the parity tests (tests/test_*parity*.py), and update the README's numbers.
PINS=(
    mergekit==0.1.5
    peft==0.21.2
    torch==2.15.0
    transformers==5.24.0
    accelerate==1.15.0
    safetensors==0.8.0
    numpy==2.4.6
)

# Prints what differs from PINS (nothing when the venv matches); exits non-zero when anything does.
check_pins() {
    "$dir/bin/python" - "${PINS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

wrong = []
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name).split("+")[0]  # a local label (2.15.0+cpu) is the same release
    except PackageNotFoundError:
        have = "not installed"
    if have != want:
        wrong.append(f"{name} {have} (want {want})")
print("; ".join(wrong))
sys.exit(1 if wrong else 0)
PY
}

if [ -x "$dir/bin/python" ] && [ -x "$dir/bin/mergekit-yaml" ]; then
    if differs=$(check_pins 2>/dev/null); then
        echo "peer venv ready: $dir"
        exit 0
    fi
    echo "peer venv $dir has other versions: ${differs:-unreadable}; installing the pins" >&2
fi
python3 -m venv "$dir"
"$dir/bin/pip" install -q --upgrade pip
"$dir/bin/pip" install -q "${PINS[@]}"
differs=$(check_pins) || { echo "peer venv $dir still differs from the pins: $differs" >&2; exit 1; }
"$dir/bin/python" -c "import mergekit, peft; print('peer venv ready:', '$dir', 'peft', peft.__version__)"
