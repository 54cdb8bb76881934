# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= all,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnselect-installed

.PHONY: venv demo test lint pytest docs bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_itself.py --demo --out outputs/demo

lint: $(STAMP)
	$(PY) -m ruff check attnselect tests benchmarks examples

# Kernel tests run the Triton code on CPU tensors through the interpreter; everything else runs as users would.
pytest: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not kernels"
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -m kernels

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

test: lint pytest docs

bench: $(STAMP)
	$(VENV)/bin/attnselect bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
