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

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing below pulls a different (multi-GB) build.
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffplat demo --output $(OUT)

# Two test processes: one test's Ray often waits (starting, polling) while the other's computes.
# Each test file runs whole in one of them: its module fixtures (and the demo) are built once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

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
