# Thin targets; the logic lives in the qwen3vl package (python_backend/qwen3vl).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHECKPOINTS := .work/checkpoints
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
OPENAI_PORT ?= 9000
# What `make serve` serves: the trained demo checkpoint, or CHECKPOINT=/path/to/a/checkpoint
# (`make checkpoint` makes a random one at .work/checkpoints/small: nonsense words, for load tests).
CHECKPOINT ?= checkpoints/shapes

.PHONY: setup demo test serve checkpoint perf bench demo-accuracy train-demo soak gpu-check clean

setup: $(STAMP)

# A venv in the repository with the pinned packages; the tritonserver binary, Python backend and
# stubs come with the nvidia-pytriton wheel (qwen3vl-serve assembles the backend directory).
$(STAMP): pyproject.toml
	@echo "make setup: a virtual environment in $(VENV) with the pinned packages (once; a few minutes: torch is large)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "make setup: upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "make setup: installing this package and its pinned dependencies (torch, transformers, nvidia-pytriton:" \
	  "tritonserver and its Python backend); pip is quiet until it is done"
	$(PY) -m pip install --quiet -e '.[server,test]'
	@echo "make setup: assembling tritonserver's Python backend directory"
	$(PY) -m qwen3vl.cli.serve --check
	touch $(STAMP)
	@echo "make setup: done"

checkpoint: setup
	$(VENV)/bin/qwen3vl-make-checkpoint --out $(CHECKPOINTS)/small --preset small

# The bundled demo checkpoint (checkpoints/shapes) answers questions about a new picture.
demo: setup
	$(PY) -m qwen3vl.tools.demo $(DEMO_ARGS)

# Remake checkpoints/shapes in its two stages: the questions (27 to 50 minutes on 2 cores),
# then the fine-tuning stage that adds JSON answers (DEMO_FINETUNE; minutes). The same bytes
# for the same seed, machine and thread count.
DEMO_FINETUNE ?= --steps 1500 --lr 0.001 --probe-weight 0 --json-share 0.4
train-demo: setup
	$(VENV)/bin/qwen3vl-train-demo --out build/shapes-base
	$(VENV)/bin/qwen3vl-train-demo --out checkpoints/shapes --init-from build/shapes-base $(DEMO_FINETUNE)

# The demo checkpoint's accuracy through real servers, with ablations (a few minutes).
demo-accuracy: setup
	$(VENV)/bin/qwen3vl-bench demo-accuracy --out bench/results/demo_accuracy.json

# The README's "Use the server": tritonserver and the OpenAI API beside it, until Ctrl-C.
serve: setup
	$(VENV)/bin/qwen3vl-serve --checkpoint $(CHECKPOINT) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --openai-port $(OPENAI_PORT)

# perf_analyzer over gRPC streaming against a running server (make serve in another shell).
perf: setup
	$(PY) -m qwen3vl.tools.perf --url 127.0.0.1:$(GRPC_PORT) $(PERF_ARGS)

# The language engine's ratios, side by side in one run (BENCH_ARGS=--quick: under 5 minutes).
bench: setup
	$(VENV)/bin/qwen3vl-bench $(BENCH_ARGS) --out bench/results/engine_bench-small-cpu.json

# Several hundred mixed requests above the batch limit: nothing lost, memory given back (SOAK_ARGS).
soak: setup
	$(VENV)/bin/qwen3vl-soak $(SOAK_ARGS)

# The prepared GPU check around the serving engine (docs/gpu.md); needs a CUDA GPU. It runs with
# the Python at hand (the venv's when there is one, else GPU_PYTHON): no tritonserver, no install.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py --out bench/results $(GPU_CHECK_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf .work
