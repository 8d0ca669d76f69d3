# make test: create .venv if missing, install torch (CPU build pinned for this machine) and nanoseek[dev], lint, test.
# make demo: the cpu speedrun (tokenizer -> pretrain -> SFT -> GRPO -> eval -> report), then serve the model.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.nanoseek-installed

.PHONY: install test test-all demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check nanoseek tests bench

test: $(STAMP) lint
	$(PY) -m pytest -q -rs -m "not slow"

test-all: $(STAMP) lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m nanoseek speedrun --preset cpu --out runs/demo --serve

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
