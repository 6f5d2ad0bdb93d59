"""One process of the 2-process loopback training test (tests/test_multihost_train.py): 4 CPU
devices here, one global 8-device mesh; runs `tgpo-jax train --config CONFIG` exactly as a user
would on each host of a pod slice, the coordinator named by the TGPO_* environment or by
`sharding.distributed.*` overrides (any further arguments)."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", int(os.environ.get("WORKER_LOCAL_DEVICES", "4")))
    from tgpo_jax.cli import main

    sys.exit(main(["train", "--config", sys.argv[1], *sys.argv[2:]]))
