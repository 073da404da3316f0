# The two README commands are `make run` and `make test`; each sets up
# everything it needs first (scripts/setup.sh is incremental).
PROMPT ?= The three primary colours are
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup run test bench typecheck wheel clean

setup:
	./scripts/setup.sh

run: setup
	$(BIN)/xybrid generate "$(PROMPT)" --max-tokens 64 --stats

# pytest (not `python -m pytest`) so the installed package is imported, not
# the source tree, which has no compiled extension.
test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

typecheck: setup
	$(BIN)/mypy

bench:
	XYBRID_EXTRAS=bench,test ./scripts/setup.sh
	$(BIN)/python -m bench $(BENCH_ARGS)

# The release chain: sdist, portable wheel built from it offline, auditwheel,
# smoke test in a fresh venv without a compiler (scripts/build_wheel.sh).
wheel:
	./scripts/build_wheel.sh

clean:
	rm -rf build $(VENV)
