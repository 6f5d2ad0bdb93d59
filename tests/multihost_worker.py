"""One process of the loopback multi-process test (tests/test_multihost.py).

Run as `python tests/multihost_worker.py --ckpt DIR --out DIR --coordinator 127.0.0.1:PORT
--num-processes 2 --process-id I`: 4 CPU devices per process, one global 8-device mesh, the
checkpoint loaded straight into its shardings, a jitted forward on the global batch assembled from
this process's rows, and the gathered logits / parameter checksums written to --out.

The helpers (make_batch, forward_logits, param_checksums) are imported by the test too, so the
single-process reference runs exactly the same code."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

MESH = {"data": 2, "fsdp": -1, "tensor": 2}  # -1: the rest of the devices of all processes (2 here)
BATCH, SEQ = 8, 12


def make_batch(vocab_size: int, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed left-padded batch: (tokens [B, T] int32, mask [B, T] int32), pad id 0."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, seq + 1, size=batch)
    lengths[0] = seq
    mask = (np.arange(seq)[None, :] >= (seq - lengths)[:, None]).astype(np.int32)
    tokens = rng.integers(1, vocab_size, size=(batch, seq)).astype(np.int32) * mask
    return tokens, mask


def forward_logits(model, tokens_local: np.ndarray, mask_local: np.ndarray, mesh, rules) -> np.ndarray:
    """Global batch from this process's rows -> jitted forward -> logits gathered on every host."""
    from tgpo_jax.models.decoder import apply, left_pad_positions
    from tgpo_jax.sharding.distributed import global_to_host, host_local_to_global

    spec = rules.spec(("batch", "seq"))
    tokens = host_local_to_global(tokens_local, mesh, spec)
    mask = host_local_to_global(mask_local, mesh, spec)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens_BT, mask_BT):
        logits, _ = apply(graphdef, state, "__call__", tokens_BT, left_pad_positions(mask_BT), mask_BT)
        return logits

    return global_to_host(fwd(state, tokens, mask))


def param_checksums(model) -> dict[str, dict]:
    """{param path: {sha256, sum, shape}} of every parameter, gathered to this host."""
    from tgpo_jax.models.hf_export import flat_params
    from tgpo_jax.sharding.distributed import global_to_host

    out = {}
    for path, value in sorted(flat_params(model).items()):
        host = np.ascontiguousarray(global_to_host(value))
        out[path] = {
            "sha256": hashlib.sha256(host.tobytes()).hexdigest(),
            "sum": float(host.astype(np.float64).sum()),
            "shape": list(host.shape),
        }
    return out


def shard_report(model) -> dict[str, dict]:
    """Per parameter: whether it is fully addressable here, and this process's shard sizes."""
    from tgpo_jax.models.hf_export import flat_params

    return {
        path: {
            "fully_addressable": bool(v.is_fully_addressable),
            "size": int(v.size),
            "local_shard_sizes": [int(s.data.size) for s in v.addressable_shards],
        }
        for path, v in flat_params(model).items()
    }


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--local-devices", type=int, default=4)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _args(argv)
    t0 = time.time()
    jax.config.update("jax_num_cpu_devices", a.local_devices)  # before the backend starts

    from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, load_sharded
    from tgpo_jax.sharding.distributed import DistributedConfig, initialize, process_batch_slice

    started = initialize(DistributedConfig(a.coordinator, a.num_processes, a.process_id))
    assert initialize() is True  # idempotent: a second call does nothing
    assert started and jax.process_count() == a.num_processes and jax.process_index() == a.process_id
    mesh = build_mesh(MeshConfig.from_dict(MESH))
    rules = ShardingRules()
    model = load_sharded(a.ckpt, mesh, rules)

    tokens, mask = make_batch(model.cfg.vocab_size)
    rows = process_batch_slice(BATCH)
    assert rows == process_batch_slice(BATCH, mesh, rules.spec(("batch", "seq"))), rows
    logits = forward_logits(model, tokens[rows], mask[rows], mesh, rules)
    sums = param_checksums(model)

    pid = a.process_id
    np.save(os.path.join(a.out, f"logits_p{pid}.npy"), logits)
    meta = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
        "rows": [rows.start, rows.stop],
        "shards": shard_report(model),
        "seconds": time.time() - t0,
    }
    with open(os.path.join(a.out, f"meta_p{pid}.json"), "w") as f:
        json.dump(meta, f)
    if pid == 0:
        with open(os.path.join(a.out, "checksums.json"), "w") as f:
            json.dump(sums, f)
    print(f"process {pid}: done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
