"""Tessera's benchmark harness: `make bench` or `python -m bench.run`.

One run starts the servers a set of targets needs (a node, a bare gRPC echo server), drives
every target with the same closed-loop client in a separate process, and prints throughput,
latency, the ratios between targets and the servers' memory. See docs/benchmarks.md.
"""
