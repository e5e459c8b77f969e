"""Benchmarks: `make bench`. Each tests/bench/bench_<area>.py exposes run() -> list[dict]."""
