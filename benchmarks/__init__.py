"""Benchmarks: `python benchmarks/run.py --suite NAME`; the shared harness is benchmarks/harness.py."""
