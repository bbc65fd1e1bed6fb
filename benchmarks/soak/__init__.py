"""`make soak`: a bounded chaos soak of warmpool (issue 16). Run: python -m benchmarks.soak --help."""
