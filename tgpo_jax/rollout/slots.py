"""How many decode slots the rollout engine runs with (rollout/engine.py), decided once for the
sampler and for the memory estimator (sharding/estimate.py). No JAX import: the estimator runs
without it."""

from __future__ import annotations


def auto_slots(requests: int, shards: int) -> int:
    """The engine's decode slots when the config leaves them at 0: half the requests, rounded up to
    a multiple of the batch shards (every device holds as many slots). Half: with a spread of
    response lengths each slot serves about two requests, so finished rows are refilled instead of
    idling (`tgpo-jax bench rollout` measures the gain), and the KV cache is half the static
    sampler's."""
    half = -(-requests // 2)
    return -(-half // shards) * shards


def engine_slots(requests: int, configured: int, shards: int) -> int:
    """The slots (KV-cache rows) one engine call holds: `configured` (0: auto_slots), never more
    than the requests (the engine clamps to them)."""
    return min(configured or auto_slots(requests, shards), requests)
