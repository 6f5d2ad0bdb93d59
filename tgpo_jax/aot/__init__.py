"""Ahead-of-time compilation for TPU slices on a CPU machine (libtpu: the `tpu-aot` extra):
`topology` (slice names -> compile-only devices), `programs` (a run's programs from shapes and
shardings alone), `compile` (the TPU compiler's memory figures per program), `cli`."""
