# One entry point for people and CI. `make test` is what .ci/run calls.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PEERS  ?= .venv-peers

.PHONY: install install-base test test-rust test-python peers demo example bench clean

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

test-rust:
	cargo test --release -p umerge-core

test-python: install
	$(BIN)/python -m pytest -q

# Every test: Rust, then Python. Peer parity tests run when the peer venv could be built.
test: install
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
