# Two set-up commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/relay.dev.yaml

.PHONY: run test lint lock bench bench-smoke clean

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,tracing]'
	@touch $(STAMP)

run: $(STAMP)
	@echo "Starting the hub on $(CONFIG) (ingress http://127.0.0.1:8080, admin console http://127.0.0.1:8081/, demo sink http://127.0.0.1:9100)."
	@echo "In another shell:  $(BIN)/relay --config $(CONFIG) send tests/shared/samples/order_shipped.json"
	$(BIN)/relay --config $(CONFIG) up --with-sink

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check relay workers tests bench
	$(BIN)/mypy relay workers

# The bench also needs the bench extra (matplotlib for the chart, py-spy for --profile,
# requests for the obvious design it is compared with). Knobs go in BENCH_ARGS, e.g.
#   make bench BENCH_ARGS="--stress"     the whole run under stress-ng --cpu 2 --cpu-load 60
#                                        (apt-get install -y stress-ng; --stress-load/--stress-cpus)
#   make bench BENCH_ARGS="--phases steady --profile var/prof"   lone events, profiled
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,tracing,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-smoke: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --smoke --out var/bench-smoke $(BENCH_ARGS)

# Pin what the tests ran with (after a dependency change): requirements.lock.
lock: $(BENCH_STAMP)
	@{ head -3 requirements.lock; $(BIN)/pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock.new
	@mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) var .pytest_cache
