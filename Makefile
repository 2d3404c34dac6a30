# Two commands do everything on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= 2

.PHONY: install generate check-generated run demo test test-gpu bench clean

install: $(VENV)/.installed

# Pinned dependencies first, then the package itself (editable, no deps): passing the pins as `-c`
# to the editable install also constrains pip's isolated build environment, which breaks the build.
$(VENV)/.installed: pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-cpu.txt
	$(PIP) install -q --no-deps -e .
	touch $@

generate: install
	$(PY) -m nsa_codegen generate

# CI: regenerate, then fail if the committed generated/ differs.
check-generated: generate
	git diff --exit-code --stat generated/
	@test -z "$$(git status --porcelain generated/)" || { git status --porcelain generated/; exit 1; }

run: generate
	$(PY) -m nsa_codegen demo

demo: run

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(JOBS) -q

# On a CUDA machine (the H200): the GPU lane.
test-gpu:
	$(PYTHON) -m pytest -m gpu -q

bench:
	$(PYTHON) -m nsa_codegen bench

clean:
	rm -rf $(VENV) build *.egg-info
