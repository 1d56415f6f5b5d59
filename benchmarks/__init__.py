"""Benchmarks: measurements reported as markdown, never timed assertions (`make bench`)."""
