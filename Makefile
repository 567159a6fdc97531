# famtron: `make install` builds .venv, `make demo` trains the tiny FAM model end to end on CPU,
# `make test` runs the suite (`make test TESTS=tests/test_slurm.py` runs one file).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/stdlib-byte-512
TESTS ?= tests

.PHONY: demo test install clean

install: $(VENV)/.installed

# The pinned dependencies, then famtron itself, editable: `import model` works from any folder
# and runs this checkout's code (configs/ and slurm/ stay beside it).
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(PY) -m data_prep.shard --input stdlib --tokenizer byte --seq-len 512 --output $(DEMO_DATA)
	$(PY) -m pipeline.train --config configs/demo.yaml

test: install
	bash slurm/install.sh
	$(PY) -m pytest -q $(TESTS)

clean:
	rm -rf runs data mlflow.db mlruns
