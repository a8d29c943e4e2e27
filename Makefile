# The README's two commands: `make demo` and `make test`. Both install what they need first.
# On a GPU machine, choose the torch build with TORCH=..., e.g.
#   make install TORCH="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_RUNS ?= runs/demo
RESULTS_RUNS ?= runs/results
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test demo results clean

install: $(VENV)/.installed

# constraints.txt pins the versions CI tested; pyproject.toml keeps ranges a GPU user can satisfy.
# torchattacks 3.5.1 pins requests~=2.25.1: it is installed without its dependencies (what it
# really needs, scipy/tqdm/requests, comes through pyproject.toml).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps -c constraints.txt torchattacks==3.5.1
	touch $@

test: install
	$(PY) -m pytest -q -ra

demo: install
	$(PY) -m benchmarks.demo --runs $(DEMO_RUNS)

# Trains, calibrates, tests and times every demo model; writes results/ (tables and figures).
results: install
	$(PY) -m benchmarks.results --runs $(RESULTS_RUNS)

clean:
	rm -rf runs lightning_logs .pytest_cache
