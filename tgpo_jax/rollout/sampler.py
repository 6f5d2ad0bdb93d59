"""The rollout sampler (host side): bucketing, padding, sharding of inputs, compile bookkeeping,
around the one sampling program of the project, the continuous-batching engine (engine.py).

Prompts are left-padded to a length bucket and the prompt count padded to a multiple of the batch
shards, so compilation happens once per (prompt count, bucket, sampling params). Each call's
program allocates its own KV cache (decode_loop.py says why): nothing stays allocated between calls.
The weights are an argument of every call (`sample(..., state=)`), so the trainer and the in-run
evaluator sample the current parameters without setting anything on the sampler.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tgpo_jax.models.kv_cache import KVCache
from tgpo_jax.rollout.decode_loop import Rollout
from tgpo_jax.rollout.engine import engine_fn
from tgpo_jax.rollout.sampling import SamplingParams
from tgpo_jax.rollout.slots import engine_slots
from tgpo_jax.sharding.distributed import global_to_host, put_batch

DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass
class CompileStats:
    compiles: int = 0
    compile_s: float = 0.0
    shapes: list = dataclasses.field(default_factory=list)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(
        f"a prompt of {n} tokens is longer than the largest prompt bucket ({buckets[-1]}); "
        "raise the buckets or drop the prompt"
    )


class Sampler:
    """Samples n responses per prompt from `model` (a Decoder, sharded or not) with the rollout
    engine. `sample(..., state=)` takes the weights (an nnx.State of the model's structure; default:
    the model's own), so new weights never recompile and nothing is set from outside.
    slots: the engine's decode slots; 0: `slots.auto_slots` of each call's request count."""

    def __init__(
        self,
        model,
        *,
        stop_ids: Sequence[int],
        pad_id: int = 0,
        prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
        slots: int = 0,
        kv_pages: int = 0,
        page_size: int = 128,
    ):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.sharding = getattr(model, "sharding", None)
        self.stop_ids = tuple(sorted(set(int(s) for s in stop_ids)))
        self.pad_id = pad_id
        self.buckets = tuple(sorted(prompt_buckets))
        self.slots = slots
        self.paged = dict(kv_pages=kv_pages, page_size=page_size) if kv_pages else {}  # engine_fn's
        self.stats = CompileStats()
        self._compiled: dict = {}

    # ------------------------------------------------------------------ host -> device
    def _batch_shards(self) -> int:
        if self.sharding is None:
            return 1
        mesh, spec = self.sharding.mesh, self.sharding.rules.spec(("batch",))[0]
        names = () if spec is None else (spec,) if isinstance(spec, str) else spec
        return int(np.prod([mesh.shape[a] for a in names])) if names else 1

    def padded_prompts(self, n: int) -> int:
        """The prompt count a call of n prompts runs at: rounded up to the batch shards (filler rows)."""
        shards = self._batch_shards()
        return -(-n // shards) * shards

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.sharding is None:
            return jnp.asarray(x)
        return put_batch(x, self.sharding.mesh, self.sharding.rules)

    def _pad_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        T = bucket_length(max(map(len, prompts)), self.buckets)
        P = self.padded_prompts(len(prompts))
        tokens = np.full((P, T), self.pad_id, np.int32)
        mask = np.zeros((P, T), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
        for i in range(len(prompts), P):  # filler rows: one token, results dropped
            tokens[i, -1], mask[i, -1] = self.pad_id, 1
        return tokens, mask

    # ------------------------------------------------------------------ compile + run
    def slots_for(self, P: int, params: SamplingParams) -> int:
        """The decode slots a call of P (padded) prompts runs with."""
        return engine_slots(P * params.n, self.slots, self._batch_shards())

    def _jitted(self, P: int, params: SamplingParams):
        fn = functools.partial(
            engine_fn, params=params, stop_ids=self.stop_ids, slots=self.slots_for(P, params), **self.paged
        )
        return jax.jit(fn, static_argnums=(0,))

    def lower(self, P: int, T: int, params: SamplingParams) -> jax.stages.Lowered:
        """The rollout program for P prompts (a multiple of the batch shards) in a T-token bucket,
        lowered from shapes and shardings alone: nothing is allocated, so it lowers for a mesh of
        devices this process cannot run on (the AOT compile of tgpo_jax/aot)."""
        prompt = _abstract((P, T), jnp.int32, self._batch_sharding(2))
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        return self._jitted(P, params).lower(self.graphdef, _abstract_tree(self.state), prompt, prompt, key)

    def _executable(self, P: int, T: int, params: SamplingParams):
        key = (P, T, params)
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = self.lower(P, T, params).compile()
            self.stats.compiles += 1
            self.stats.compile_s += time.perf_counter() - t0
            self.stats.shapes.append(key[:2])
        return self._compiled[key]

    def _batch_sharding(self, ndim: int):
        if self.sharding is None:
            return None
        return NamedSharding(self.sharding.mesh, self.sharding.rules.spec(("batch",) + (None,) * (ndim - 1)))

    def _cache_shardings(self, shapes: KVCache) -> KVCache | None:
        if self.sharding is None:
            return None
        mesh, rules = self.sharding.mesh, self.sharding.rules
        kv = jax.tree.map(
            lambda a: NamedSharding(mesh, _divisible_spec(rules, shapes.kv_axes, a.shape, mesh)), shapes.k
        )
        return KVCache(kv, kv, NamedSharding(mesh, rules.spec(("batch", None))), NamedSharding(mesh, PartitionSpec()))

    def cache_shapes(self, B: int, S: int) -> KVCache:
        """The KV cache a call allocates for B rows x S slots, as ShapeDtypeStructs carrying their
        shardings (for memory accounting)."""
        shapes = jax.eval_shape(lambda: KVCache.init(self.cfg, B, S))
        shardings = self._cache_shardings(shapes)
        if shardings is None:
            return shapes
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)

    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, key: jax.Array, *, state=None
    ) -> Rollout:
        """n responses for each prompt (token id lists); rows ordered prompt-major. state: the
        weights to sample (an nnx.State of the model's structure, e.g. the trainer's current
        parameters); None: the model's own."""
        state = self.state if state is None else state
        if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state)):
            # a train step donates the state it is given; running on its freed buffers crashed the
            # process instead of raising
            raise ValueError(
                "the weights given to Sampler.sample were donated (deleted) by a train step: pass the "
                "step's returned state (state=train_state.params)"
            )
        tokens, mask = self._pad_prompts(prompts)
        exe = self._executable(tokens.shape[0], tokens.shape[1], params)
        out = exe(state, self._put(tokens), self._put(mask), key)
        keep = len(prompts) * params.n
        t, m, lp, ln, fin = (global_to_host(x)[:keep] for x in out)  # collective when multi-process
        rep = lambda x: np.repeat(x, params.n, axis=0)[:keep]  # noqa: E731
        return Rollout(t, m, lp, ln, fin, rep(tokens), rep(mask))


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _abstract_tree(tree):
    """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs with the same shapes, dtypes and shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _divisible_spec(rules, axes, shape, mesh) -> PartitionSpec:
    from tgpo_jax.sharding.rules import axis_size

    spec = rules.spec(axes)
    return PartitionSpec(*(e if shape[i] % axis_size(mesh, e) == 0 else None for i, e in enumerate(spec)))
