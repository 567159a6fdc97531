# famtron: `make demo` trains the tiny FAM model end to end on CPU; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/stdlib-byte-512

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: install
	$(PY) -m data_prep.shard --input stdlib --tokenizer byte --seq-len 512 --output $(DEMO_DATA)
	$(PY) -m pipeline.train --config configs/demo.yaml

test: install
	bash slurm/install.sh
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data mlflow.db mlruns
