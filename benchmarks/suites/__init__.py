"""Benchmark suites: each module exposes run(ctx) -> Iterator[dict] (and optionally plot(rows, path))."""
