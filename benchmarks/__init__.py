"""Benchmarks behind the `make bench-*` targets and the learning benchmark; not imported by the library."""
