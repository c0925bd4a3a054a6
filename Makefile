# Developer tasks. Keep each target small; see docs/ for what they do.

PYTHON ?= python3

.PHONY: bench bench-quick

# Benchmarks (docs/benchmarks.md). Pass flags with BENCH_ARGS, e.g. BENCH_ARGS="--concurrency 64".
bench:
	$(PYTHON) -m bench.run $(BENCH_ARGS)

# CI smoke run: 1 s per target; exits 0 on a missed target, non-zero only if a run breaks.
bench-quick:
	$(PYTHON) -m bench.run --quick $(BENCH_ARGS)
