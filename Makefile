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
	# the build backend's notice about package folders mapped into the editable install is not ours to act on
	PYTHONWARNINGS=ignore $(PIP) install -q --no-deps -e .
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

# GPU targets: the project's venv when there is one, else the machine's own Python (a GPU image brings
# its CUDA build of torch and Triton; `make install` would bring the CPU build). Both say so and stop
# when that Python cannot import torch.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
NEED_TORCH = @$(GPU_PY) -c "import torch" 2>/dev/null || { echo "$(GPU_PY) cannot import torch: run 'make install' or use a Python with CUDA torch (PYTHON=...)"; exit 1; }

test-gpu:
	$(NEED_TORCH)
	$(GPU_PY) -m pytest -m gpu -q

bench:
	$(NEED_TORCH)
	$(GPU_PY) -m nsa_codegen bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
