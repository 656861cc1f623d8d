# Two commands: `make run` serves the demo model, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test bench bench-load bench-flash bench-grammar validate-model install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@./ops/fast-blas.sh
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml ops/test-tools.sh | $(BIN)/python
	@./ops/fast-blas.sh
	@./ops/test-tools.sh
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(BIN)/moebus up $(ARGS)

# The suite runs in two processes (~12 instead of ~18 min on 2 cores; each test file's tests stay
# together, --dist loadscope); TEST_PROCESSES=1 runs it in one.
TEST_PROCESSES ?= 2

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(if $(filter-out 1,$(TEST_PROCESSES)),-n $(TEST_PROCESSES) --dist loadscope) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.hops
	$(BIN)/python -m bench.load
	$(BIN)/python -m bench.balance
	$(BIN)/python -m bench.structured
	$(BIN)/python -m bench.conversation
	$(BIN)/python -m bench.speculation

bench-flash: $(VENV)/.installed-test
	$(BIN)/python -m bench.flash $(BENCH_ARGS)

bench-load: $(VENV)/.installed-test
	$(BIN)/python -m bench.load $(BENCH_ARGS)

bench-grammar: $(VENV)/.installed-bench
	$(BIN)/python -m bench.grammar $(BENCH_ARGS)

validate-model: $(VENV)/.installed-bench
	$(BIN)/python -m bench.validate $(BENCH_ARGS)
