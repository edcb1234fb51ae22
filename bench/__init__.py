"""Benchmarks of the hub: ``python -m bench.run`` (``make bench``), see docs/benchmarks.md.

Every piece of load runs in its own process: the load generator (``bench.loadgen``), the bare
aiohttp ceiling server (``bench.bare``) and the recording sinks (``bench.sink``), beside the
hub's own ingress and worker processes and a private redis-server. Only 127.0.0.1 is used.
"""
