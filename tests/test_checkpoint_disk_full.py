"""Running out of disk while saving leaves the previous checkpoint intact (a real full filesystem:
a small tmpfs, mounted when the test runs as root; skipped otherwise)."""

import jax.numpy as jnp
import numpy as np
import pytest

from tgpo_jax.train.checkpoint import RunCheckpoints, abstract_of


def test_full_disk_during_save_keeps_the_previous_checkpoint(small_tmpfs):
    small_fs = small_tmpfs("600k")
    # 400 kB of incompressible values: one checkpoint fits in 600 kB, two do not
    state = {"w": jnp.asarray(np.random.default_rng(0).random(100_000), jnp.float32)}
    ckpt = RunCheckpoints(small_fs, keep=3, keep_best=0, async_save=False)
    ckpt.save(1, state, {"iteration": 1})
    ckpt.wait()
    with pytest.raises(Exception, match="No space left on device|RESOURCE_EXHAUSTED"):
        ckpt.save(2, {"w": state["w"] + 1}, {"iteration": 2})
        ckpt.wait()
    try:
        ckpt.close()
    except Exception:
        pass
    again = RunCheckpoints(small_fs, keep=3, keep_best=0, async_save=False)
    found = again.restore_latest(abstract_of(state))
    assert found is not None
    step, restored, meta = found
    assert step == 1 and meta["iteration"] == 1
    assert np.array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
