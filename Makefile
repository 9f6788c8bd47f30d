# Two commands matter: `make test` (build + whole test suite) and `make bench` (the main job).
# Both create .venv when missing, install the pinned development requirements and build the
# extension against the torch in that venv (--no-build-isolation).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.resfused-built
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench build info lint format clean fuzz soak

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	@echo "building resfused (log: $(VENV)/build.log)"
	@MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -v -e . --no-build-isolation > $(VENV)/build.log 2>&1 \
		|| (tail -n 60 $(VENV)/build.log; echo "build failed; full log: $(VENV)/build.log"; exit 1)
	@grep -h '^ *resfused:' $(VENV)/build.log | sed 's/^ *//'
	@touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m resfused.info
	RESFUSED_REQUIRE_NATIVE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(BUILT)
	$(PY) -m benchmarks $(BENCH_ARGS)

info: $(BUILT)
	$(PY) -m resfused.info

CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

# The differential fuzz test at 10,000 drawn block configurations (CI runs 500 of them in make test).
fuzz: $(BUILT)
	RESFUSED_REQUIRE_NATIVE=1 RESFUSED_FUZZ_CONFIGS=$${RESFUSED_FUZZ_CONFIGS:-10000} $(PY) -m pytest -q tests/test_fuzz.py

# The soak test: 2,000 forwards of a fused resnet50 from 2 threads with load_state_dict, dtype
# and train/eval changes in between, every output checked and resident memory bounded (README,
# Memory). 4-6.5 minutes on a shared 2-core Xeon; RESFUSED_SOAK_FORWARDS / RESFUSED_SOAK_SEED change it.
soak: $(BUILT)
	RESFUSED_REQUIRE_NATIVE=1 RESFUSED_SOAK_FORWARDS=$${RESFUSED_SOAK_FORWARDS:-2000} $(PY) -m pytest -q -s tests/test_soak.py

lint: $(DEPS)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(DEPS)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build resfused/_C*.so *.egg-info $(BUILT)

# Not part of `make test` or CI (it needs what CI lacks):
#   make compat      the CPU + Triton-interpreter tests with the GPU machine's stack (Python 3.12,
#                    torch 2.11, triton 3.6) in .venv-compat, on a build of the committed tree in
#                    /tmp (tools/compat.sh says what and how long): by default the Triton,
#                    registration and backend tests (173, ~3 min); `make compat COMPAT_TESTS=tests`
#                    runs the whole non-GPU suite (1420 tests, ~55 min on 2 busy cores)
.PHONY: compat

compat:
	bash tools/compat.sh

# make gpu-check: on a machine with an NVIDIA GPU and no network, with its own Python (PYTHON=...,
# default python3; no venv, nothing installed), within 8 minutes, into GPU_CHECK_OUT (default
# gpu-check/, git-ignored): the build for that GPU only; every `gpu` test (tests/test_gpu.py: the
# auto backend on every block and fused resnet50 / resnext50 in fp16/bf16/fp32, the CUDA grouped
# 3x3, tails and training BN, a training step, CUDA graphs, streams, cuda:1 with two GPUs, compile,
# autocast; and the other files' GPU tests) against float64; the GPU benchmark (grouped 3x3 vs
# cuDNN, blocks, whole models at batch 32 fp16/bf16 vs eager channels_last, with and without CUDA
# graphs, each row's error vs float64, the GPU targets; torch.compile max-autotune only with
# GPU_CHECK_BENCH_ARGS="... --compile"). Without a GPU it says so in one line and fails (exit 2).
# tools/gpu_check.py and the README ("On a GPU machine") say what it runs and writes.
.PHONY: gpu-check
GPU_CHECK_OUT ?= gpu-check

gpu-check:
	$(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),python3) tools/gpu_check.py --out $(GPU_CHECK_OUT)
