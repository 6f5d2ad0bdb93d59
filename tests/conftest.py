import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA:CPU aborts the whole process (SIGABRT, "Termination timeout ... exceeded") when the devices of
# a collective arrive more than 40 s apart. Here 8 fake devices share 2 cores, and on a loaded CI
# machine an FSDP run's all-gather can wait that long: it killed pytest inside test_demo, with the
# reason lost to output capture. A real deadlock still ends the run, after 10 minutes. Set before
# the backend starts; subprocess tests inherit it.
_RENDEZVOUS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
    "--xla_cpu_collective_call_terminate_timeout_seconds=600",
    "--xla_cpu_collective_timeout_seconds=600",
)
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_RENDEZVOUS]).strip()

import jax  # noqa: E402

# 8 fake CPU devices for sharding tests; must run before the backend is first used.
jax.config.update("jax_num_cpu_devices", 8)

# Many tests compile the same functions at the same tiny shapes (every end-to-end run builds its own
# sampler, score and train step): JAX's persistent compilation cache turns the repeats into loads.
# In-process only (subprocess tests compile on their own); keys include the HLO and the JAX version.
_CACHE = os.environ.get("TGPO_TEST_COMPILE_CACHE") or os.path.join(
    __import__("tempfile").gettempdir(), f"tgpo_jax_test_compile_cache_{os.getuid()}"
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import subprocess  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> the path of a fresh tmpfs of that size (a real full disk); skips the test
    where mounting is not allowed. Unmounted at teardown."""
    mounted = []

    def mount(size: str) -> str:
        mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        return str(mnt)

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
