"""Toy tasks with generated data (`tgpo-jax demo`, `tgpo-jax experiment divergence`)."""
