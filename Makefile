# The two commands of the README:  make demo   and   make test
# Each creates .venv, installs the pinned dependencies and builds the extension on first use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DEPS    = $(VENV)/.deps-installed
export MAX_JOBS ?= 2

.PHONY: demo test build bench bench-quick selftest wheel clean

$(DEPS): scripts/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r scripts/requirements.txt
	touch $@

# Compiles the CPU kernels, and the CUDA kernels whenever nvcc is found; fails on any ptxas spill.
build: $(DEPS)
	$(PY) scripts/build.py

demo: build
	$(VENV)/bin/dalle-fast demo

test: build
	$(PY) -m pytest -q -p no:cacheprovider tests

selftest: build
	$(PY) -m dalle_fast.selftest

# Benchmarks also compare against peers (dalle-pytorch): installed on first use.
PEERS = $(VENV)/.peers-installed
$(PEERS): $(DEPS) scripts/requirements-peers.txt scripts/requirements-peers-deps.txt
	$(PY) -m pip install -q --no-deps -r scripts/requirements-peers.txt
	$(PY) -m pip install -q -r scripts/requirements-peers-deps.txt
	touch $@

bench: build $(PEERS)
	$(PY) benchmarks/run_all.py

bench-quick: build $(PEERS)
	$(PY) benchmarks/run_all.py --quick

# A binary wheel in dist/ (CPU and, where nvcc was found, CUDA kernels), requiring the torch it was built
# against; relinks the objects of `make build` (scripts/build.py --wheel).
wheel: build
	$(PY) scripts/build.py --wheel dist

clean:
	rm -rf build dist dalle_fast/_C*.so *.egg-info
