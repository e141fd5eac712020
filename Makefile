# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxtl-installed

.PHONY: install demo test bench clean

# torch/torchvision are pinned to the builds these machines carry on disk (see README);
# pyproject itself keeps torch>=2.4 open for everyone else.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fxtl demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/extract_speed.py

clean:
	rm -rf $(VENV) cache/*.h5 cache/runs
