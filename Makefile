# One entry point for people and CI. `make test` is what .ci/run calls.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PEERS  ?= .venv-peers

.PHONY: install install-base check check-rust check-python test test-rust test-python peers demo example bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip maturin setuptools wheel

# Everything: the engine, the CLI, the unlearning workbench (torch) and the test tools.
install: $(BIN)/python
	$(BIN)/pip install -q --no-build-isolation -e ".[train,dev]"

# The engine and CLI only: no torch.
install-base: $(BIN)/python
	$(BIN)/pip install -q --no-build-isolation -e .

# mergekit lives in its own virtual environment so its pins never constrain ours.
peers:
	bash benches/make_peer_venv.sh $(PEERS)

# The gates every change passes before its tests run: formatting, lints, docs, types, and the
# native module's stub (python/umerge/_core.pyi) against the compiled module.
check: check-rust check-python

check-rust:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --release -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

check-python: install
	$(BIN)/python -m ruff check python tests benches
	$(BIN)/python -m mypy python/umerge
	$(BIN)/python -m mypy.stubtest umerge._core

test-rust:
	cargo test --release -p umerge-core

test-python: install
	$(BIN)/python -m pytest -q

# The gates, then every test: Rust, then Python. Peer parity tests run when the peer venv could be
# built; under CI (CI=true) a missing peer venv or missing LUME data fails the run.
test: install check
	-$(MAKE) peers
	$(MAKE) test-rust
	$(MAKE) test-python

# The main job: the whole paper pipeline on a built-in synthetic world, CPU only (<= 15 min).
demo: install
	$(BIN)/umerge demo -o demo-out --overwrite

# The engine alone (no torch): small example checkpoints merged with TIES.
example: install-base
	$(BIN)/umerge example -o example-out --overwrite

bench: install
	$(BIN)/python benches/bench_ties.py

clean:
	rm -rf target $(VENV) $(PEERS) example-out demo-out bench-out
