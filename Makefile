# The two set-up commands of the README:
#   make demo   - builds .venv and runs the daemon on the embedded default (Ctrl+C stops it)
#   make test   - builds .venv and runs lint + the whole test suite
# torch is installed first, pinned through constraints.txt, so pip never swaps in another build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench mutants clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/streamv2v run --demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers (CI has 2 cores); see tests/conftest.py for the groups that keep a module's
# fixtures, and OBS, in one worker, and for the slow-first order. PYTEST_ARGS adds options.
PYTEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

# Not part of `make test` (minutes): each named breakage of tests/mutants/*.toml applied to a
# scratch copy, and the tests that guard it run there; every one must fail (README: Development).
# MUTANTS_ARGS: e.g. tests/mutants/i28.toml, --only NAME, --list.
mutants: $(STAMP)
	$(BIN)/python tests/mutants/run.py $(MUTANTS_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/engine_latency.py --model tiny --size 512 --steps 1
	$(BIN)/python bench/feature_bank.py --model tiny --size 512

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
