import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# 8 fake CPU devices for sharding tests; must run before the backend is first used.
jax.config.update("jax_num_cpu_devices", 8)
