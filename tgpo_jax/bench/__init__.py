"""Benchmarks (`tgpo-jax bench ...`)."""
