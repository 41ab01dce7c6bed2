# Quick start: `make demo` (set-up + main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Test workers (pytest-xdist): the suite is compile-bound, and XLA compiles on one core.
TEST_WORKERS ?= 2

.PHONY: install demo test bench bench-cpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m research.train -m experiment=demo hydra.sweep.dir=$(DEMO_DIR)
	$(PY) -m research.analyze report $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) -m research.bench

# The same with the CPU plugin (kernels, keep-awake, compiler options) and its malloc launcher.
bench-cpu: $(STAMP)
	$(PY) -m ladder_cpu.launch research.bench 'plugins=[cpu]'

clean:
	rm -rf $(VENV) runs outputs multirun
