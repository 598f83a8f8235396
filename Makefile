# Two commands. Each sets up .venv first when it is missing or stale (the stamp is keyed to
# the hash of pyproject.toml and constraints.txt): the CPU torch 2.13.0 first, so pip never
# pulls a multi-GB CUDA build, then dbl_scale with its dev extra, pinned by constraints.txt.
#   make demo    the main job: ShapesCaptions, triplet vs DBL on 2 CPU ranks, compared
#   make test    the test suite (ARGS="-k resume" passes options to pytest; tiers are markers:
#                ARGS='-m "not slow"' leaves out the tests of a minute or more)
#   make test-fast    the tests that start no process (under 3 minutes): the developer's loop
#   make bench NAME=scale ARGS="--images 100000"   a benchmark of benchmarks/ (loss, eval, scale, methods, data, gpu)
#   make gpu-wheels   the packages a bare GPU machine lacks, as wheels in .gpu-wheels/ (needs pip's index)
#   make gpu-check    on a GPU machine: install those wheels beside its own torch, run the `gpu` tests,
#                     then the GPU benchmark
PYTHON ?= python3
VENV := .venv
HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(HASH)

.PHONY: demo test test-fast venv bench gpu-wheels gpu-check
demo: $(STAMP)
	$(VENV)/bin/dbl-scale demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 $(ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not launch" --durations=5 $(ARGS)

bench: $(STAMP)
	@[ -n "$(NAME)" ] || { echo "make bench NAME=loss|eval|scale|methods|data|gpu [ARGS=...]" >&2; exit 2; }
	$(VENV)/bin/python -m benchmarks.$(NAME) $(ARGS)

venv: $(STAMP)

$(STAMP):
	@rm -f $(VENV)/.installed-*
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

# A GPU machine with Python 3.12, torch, transformers and accelerate of its own, and no index:
# what it lacks travels as wheels (manylinux x86-64, CPython 3.12), at most 60 MiB. DeepSpeed
# ships no wheel: it is built here from its source (pure Python: no ops are compiled).
# mlflow-skinny is MLflow's client; SQLAlchemy, alembic and cryptography back its sqlite store;
# typing_extensions and protobuf as new as pydantic and OpenTelemetry need (they shadow older ones).
DEEPSPEED := $(shell grep '^deepspeed==' constraints.txt)
GPU_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 mlflow-skinny==3.17.2 cachetools==7.3.3 GitPython==3.2.1 gitdb==4.0.12 \
	smmap==5.0.3 importlib_metadata==9.1.0 opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 \
	opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 python-dotenv==1.2.4 \
	sqlparse==0.6.1 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 fastapi==0.165.0 starlette==1.10.0 \
	databricks-sdk==0.167.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
	webdataset==1.0.2 braceexpand==0.1.7 typing_extensions==4.16.0 protobuf==7.36.2 \
	pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1 Pygments==2.21.0 packaging==26.4
GPU_PLATFORM := --only-binary=:all: --implementation cp --python-version 3.12 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_PYTHON ?= python3
GPU_JSON ?= runs/gpu_check/gpu_check.json
GPU_PARTS ?= a b c f

gpu-wheels: $(STAMP)
	rm -rf .gpu-wheels && mkdir -p .gpu-wheels
	DS_BUILD_OPS=0 $(VENV)/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w .gpu-wheels "$(DEEPSPEED)"
	$(VENV)/bin/python -m pip download --quiet --no-deps $(GPU_PLATFORM) -d .gpu-wheels $(GPU_WHEELS)
	@size=$$(du -sm .gpu-wheels | cut -f1); echo ".gpu-wheels: $$(ls .gpu-wheels | wc -l) wheels, $$size MiB"; \
	  [ $$size -le 60 ] || { echo "over 60 MiB" >&2; exit 1; }

# One command on the GPU machine (carry .gpu-wheels there): the `gpu` tests (the device against
# the CPU, the CUDA-only paths), then the GPU benchmark (writes GPU_JSON, prints the table).
gpu-check:
	@if [ -d .gpu-wheels ]; then $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile \
	  --upgrade --target .gpu-site .gpu-wheels/*.whl; fi
	PYTHONPATH="$(CURDIR)/.gpu-site:$(CURDIR)" HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m pytest -q -p no:cacheprovider \
	  -m gpu tests/test_gpu.py
	PYTHONPATH="$(CURDIR)/.gpu-site:$(CURDIR)" HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m benchmarks.gpu \
	  --json $(GPU_JSON) --parts $(GPU_PARTS) $(ARGS)
