# `make demo`, `make test`, `make bench`: each sets up .venv by itself on a machine with Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= demo-output

# Nothing is fetched at run time: models are built in code, YOLO is built from its packaged yaml.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export YOLO_OFFLINE := 1
export MLFLOW_ALLOW_FILE_STORE := true
# DeepSpeed compiles a small C++ op once; keep the build in the checkout, not in ~.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export YOLO_CONFIG_DIR := $(CURDIR)/.cache/ultralytics

.PHONY: demo test test-fast bench clean lock

# Installs exactly requirements.lock (every package, version and hash; `make lock` remakes it).
# torch and torchvision go first, by pip: on the project machines pip takes them from local files
# (uv does not look there, and would download the same wheels, GBs); uv then installs the rest from
# the lock (and compiles its bytecode, as pip does: with PYTHONDONTWRITEBYTECODE set, as on these
# machines, every process would otherwise compile every module it imports, again and again) in
# about a minute where pip took about 100 s, and leaves the torch already there alone.
$(STAMP): pyproject.toml constraints.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv==0.13.9
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/python -m uv pip install --quiet --python $(BIN)/python --require-hashes --compile-bytecode -r requirements.lock
	$(BIN)/python -m uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

# The lock: pyproject's dependencies, every extra and the test extra, with constraints.txt's pins, for Python
# 3.11 on x86_64 Linux, resolved from PyPI with every file's hash.
lock:
	$(BIN)/python -m uv pip compile pyproject.toml --extra all --extra test -c constraints.txt --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --quiet -o requirements.lock

demo: $(STAMP)
	$(BIN)/diffplat demo --output $(OUT)

# Two test processes: one test's Ray often waits (starting, polling) while the other's computes.
# Each test file runs whole in one of them: its module fixtures (and the demo) are built once; the
# longest files first (tests/conftest.py's order, which xdist would otherwise replace by test count).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/cached_latents.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/data_decode.py
	$(BIN)/python bench/generate_scale.py
	$(BIN)/python bench/data_scale.py
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/driver_load.py

clean:
	rm -rf $(OUT) bench-output .pytest_cache
