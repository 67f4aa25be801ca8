"""Benchmark suite: lazysnap against containerd's overlayfs, measured in the same run.

Run with `python -m tests.bench` (see README.md in this directory); pytest runs only the
smoke check in `test_bench_smoke.py`.
"""
