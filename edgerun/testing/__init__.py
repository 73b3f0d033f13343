"""Helpers that build small real models and packages for edgerun's tests, benchmarks and examples."""
