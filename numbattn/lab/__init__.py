"""Measuring and looking inside, not the library: benchmarks (bench.py: kernels and the whole model, the tables and
plots that BENCHMARKS.md, the CLI's `bench` and the lessons print) and the simulator tracer (tracing.py)."""
