# The two commands of the README: `make demo` and `make test`. Both set up
# everything they need from scratch (a virtualenv in .venv; Slurm and munge
# from Debian's packages for the cluster tests).
PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch only reads torchvision .pth weights (in tests, and for users who
# import them). This version is the CPU build these machines carry locally.
TORCH ?= torch==2.13.0
DEMO_DATA := data/demo_tfds
DEMO_RUN := runs/demo

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The evaluation page is checked in headless Chromium (Debian's chromium and
# chromium-driver), installed here when /usr/bin/chromium is absent.
CHROMIUM := /usr/bin/chromium /usr/bin/chromedriver

$(CHROMIUM):
	sh tests/browser/install_chromium.sh

test: $(VENV)/.test-installed $(CHROMIUM)
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m input_pipeline.build --manual_dir demo_data --data_dir $(DEMO_DATA) \
	  --image_size 128 --allow_subset
	$(PY) -m chexnet_jax.main --config configs/demo.py --workdir $(DEMO_RUN) \
	  --config.data_dir=$(DEMO_DATA)
	$(PY) -m chexnet_jax.evaluate --workdir $(DEMO_RUN) --split test

clean:
	rm -rf $(VENV) data runs .pytest_cache
