# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real data and the offline ImageNet ResNet-50, where this machine has them (the tests that need them skip
# without): the Kaggle HAM10000 folder, and a timm folder of resnet50 weights.
HAM10000_DIR ?=
RESNET50_DIR ?=

.PHONY: demo test bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

demo: $(STAMP)
	$(BIN)/python app.py

test: $(STAMP)
	$(BIN)/ruff check ham_hf app.py tests benchmarks research
	HF_HUB_OFFLINE=1 HAM10000_DIR=$(HAM10000_DIR) RESNET50_DIR=$(RESNET50_DIR) $(BIN)/python -m pytest

# CPU benchmarks behind the README's figures (minutes; not part of the tests).
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/prepare.py --data-dir $(HAM10000_DIR)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/train_throughput.py --data $(HAM10000_DIR) \
		--model $(RESNET50_DIR) --batch-size 16 --steps 6
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/latency.py --data-dir $(HAM10000_DIR) --n 100
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/app_load.py --data-dir $(HAM10000_DIR) --clients 20 --requests 10
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/soak.py --data-dir $(HAM10000_DIR) --clients 20 --minutes 10
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/predict_throughput.py --data-dir $(HAM10000_DIR) \
		--model models/ham10000-resnet50 --n 1000 --backends auto,onnx
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/cold_start.py --data-dir $(HAM10000_DIR) \
		--model models/ham10000-resnet50 --runs 2
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/robustness.py --data-dir $(HAM10000_DIR) \
		--model models/ham10000-resnet50 --n 400

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
