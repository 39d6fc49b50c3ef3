"""The benchmarks: scripts over one shared harness (benchmarks/harness.py); see README.md."""
