"""Benchmarks: each bench_*.py module has a main() printing `BENCH <name> <value> <op> <target>` lines."""
