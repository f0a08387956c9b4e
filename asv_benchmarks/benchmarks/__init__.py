"""asv benchmark suite of numbarope (see asv_benchmarks/README.md)."""
