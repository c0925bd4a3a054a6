# Developer tasks. Keep each target small; see docs/ for what they do.

PYTHON ?= python3

.PHONY: bench bench-quick bench-search bench-events bench-data mutation fuzz

# Benchmarks (docs/benchmarks.md). Pass flags with BENCH_ARGS, e.g. BENCH_ARGS="--concurrency 64".
bench:
	$(PYTHON) -m bench.run $(BENCH_ARGS)

# CI smoke run: 1 s per target, then the search bench on 2,000 generated rows, the events
# bench and the call path's micro-benchmark; exits 0 on a missed target, non-zero only if a
# run breaks.
bench-quick:
	$(PYTHON) -m bench.run --quick $(BENCH_ARGS)
	$(PYTHON) -m bench.search --quick $(SEARCH_ARGS)
	$(PYTHON) -m bench.events --quick
	$(PYTHON) -m bench.callpath --calls 2000 --rounds 1

# SearchResources through the node vs the same SQL through psycopg, 100,000 generated
# resources (about 3 minutes; not in CI). Flags via SEARCH_ARGS, e.g. SEARCH_ARGS="--repeat 3".
bench-search:
	$(PYTHON) -m bench.search $(SEARCH_ARGS)

# Event service: publish->deliver latency, throughput and idle-subscription memory against
# the same SQL through psycopg (docs/benchmarks.md).
bench-events:
	$(PYTHON) -m bench.events $(EVENTS_ARGS)

# Seeded benchmark data as JSONL for `tessera load`: make bench-data DATA=out.jsonl COUNT=1000
COUNT ?= 100000
DATA ?= bench-data.jsonl
bench-data:
	$(PYTHON) -m bench.gen_data --count $(COUNT) --jsonl $(DATA)

# Mutation testing of the pure trust-critical modules against their unit tests (about ten
# minutes on 2 cores; not in CI). Kill rates: docs/testing.md.
mutation:
	bash scripts/mutation.sh

# The call-path fuzz property (tests/integration/test_fuzz.py) with many more examples than
# CI's 250: every RPC's descriptor, random and hostile values, random bytes. About 15 min.
FUZZ_EXAMPLES ?= 20000
fuzz:
	TESSERA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTHON) -m pytest -q -o timeout=7200 tests/integration/test_fuzz.py
