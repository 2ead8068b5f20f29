# The two commands of the README: `make demo` and `make test`. Both set up
# everything they need from scratch (a virtualenv in .venv; Slurm and munge
# from Debian's packages for the cluster tests). `make test-fast` runs the
# suite less its slow and Slurm tests (pytest markers, setup.cfg).
PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch is for the tests only (nothing else needs it): they check the torch-free
# .pth reader against torch.load. This version is the CPU build these machines
# carry locally.
TORCH ?= torch==2.13.0
# Pins every package to the versions the suite passes with; `CONSTRAINTS=`
# (empty) installs the newest versions setup.cfg allows instead.
CONSTRAINTS ?= constraints.txt
PIP_INSTALL = $(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# The suite runs on this many pytest-xdist workers, each test file on one worker
# (--dist loadfile: a file's module fixtures, the Slurm cluster among them, are
# made once). Much of the suite waits on subprocesses, so 2 workers halve it on
# 2 cores; PYTEST_WORKERS=0 runs it in one process. Files go out in collection order
# (--no-loadscope-reorder; xdist would send the files of most tests first): the long
# Slurm and fault-injection files start early, beside others, and many short unit
# files fill the end, rather than the 9-test Slurm file running alone last.
PYTEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q --durations=25 $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)
DEMO_DATA := data/demo_tfds
DEMO_RUN := runs/demo

.PHONY: setup lint test test-fast demo clean compile-report

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP_INSTALL) '$(TORCH)'
	$(PIP_INSTALL) -e '.[test]'
	touch $@

# The evaluation page is checked in headless Chromium (Debian's chromium and
# chromium-driver), installed here when /usr/bin/chromium is absent.
CHROMIUM := /usr/bin/chromium /usr/bin/chromedriver

$(CHROMIUM):
	sh tests/support/install_chromium.sh

# The style gate (pyproject.toml [tool.ruff]) runs first: it takes seconds.
lint: $(VENV)/.test-installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: lint $(CHROMIUM)
	$(PYTEST) tests

test-fast: $(VENV)/.test-installed
	$(PYTEST) -m 'not slow and not slurm' tests

demo: setup
	$(PY) -m input_pipeline.build --manual_dir demo_data --data_dir $(DEMO_DATA) \
	  --image_size 128 --allow_subset
	$(PY) -m chexnet_jax.main --config configs/demo.py --workdir $(DEMO_RUN) \
	  --config.data_dir=$(DEMO_DATA)
	$(PY) -m chexnet_jax.evaluate --workdir $(DEMO_RUN) --split test

# The train step compiled for an H100 on this machine, no GPU needed
# (benchmarks/compile_report.py; rows in benchmarks/results/compile_report.json).
# A benchmark, not a test: each row is one compile of 1.5 to 9 minutes. The CUDA
# plugin of the installed jax's version goes into its own folder, never into
# $(VENV); ptxas of a CUDA 13 toolkit must be on PATH.
CUDA_PLUGIN_DIR ?= .cache/jax_cuda_plugin
JAX_VERSION = $(shell $(PY) -c 'import jax; print(jax.__version__)')
COMPILE_REPORT = PYTHONPATH=$(CUDA_PLUGIN_DIR):. $(PY) -m benchmarks.compile_report \
  --config configs/h100x1.py

$(CUDA_PLUGIN_DIR)/.jax-%:
	rm -rf $(CUDA_PLUGIN_DIR)
	$(PY) -m pip install -q --no-deps --target $(CUDA_PLUGIN_DIR) \
	  jax-cuda13-plugin==$* jax-cuda13-pjrt==$*
	touch $@

compile-report: setup
	$(MAKE) $(CUDA_PLUGIN_DIR)/.jax-$(JAX_VERSION)
	$(COMPILE_REPORT) --name default --batch 128
	$(COMPILE_REPORT) --name xla_default --batch 128 --config.gpu_command_buffers=
	$(COMPILE_REPORT) --name xla_default --batch 256 --config.gpu_command_buffers=
	$(COMPILE_REPORT) --name command_buffers --batch 128
	$(COMPILE_REPORT) --name command_buffers --batch 256
	$(COMPILE_REPORT) --name command_buffers+fused_adam --batch 128 --config.fused_optimizer=True
	$(COMPILE_REPORT) --name command_buffers+fused_adam --batch 256 --config.fused_optimizer=True
	$(COMPILE_REPORT) --name one_all_reduce --batch 128 --devices 4 \
	  --config.gpu_command_buffers=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONVOLUTION
	$(COMPILE_REPORT) --name default --batch 128 --devices 4
	$(COMPILE_REPORT) --name default --batch 128 --topology 1x4x4

clean:
	rm -rf $(VENV) data runs .pytest_cache
