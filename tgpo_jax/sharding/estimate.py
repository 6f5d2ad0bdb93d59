"""Per-device memory estimate for a TGPO run (student + optional teacher) on a target mesh.

Pure arithmetic over the parameter table (`param_specs`) and the sharding rules: no jax devices, no
weights. The mesh is the TARGET hardware's (`num_devices`), not this machine's. Input: a train config
plus the target's device count and memory (`from_train_config`; `tgpo-jax estimate` takes them as
flags or an `estimate:` section), or the EstimateConfig view written out with inline config.json
fields.

Notation (all sizes per device unless marked global):
  L layers, E hidden, H heads, K kv heads, D head_dim, F intermediate, V vocab;
  p / a / s / g / m = bytes of param_dtype / dtype (compute) / optimizer state / gradient / master copy;
  R = rollout_batch, Bm = micro_batch (the train step) or score_micro_batch (teacher scoring; 0 = micro_batch),
  T = S = prompt_len + response_len, C = min(logits_chunk, response_len).
A dimension's local size is its global size divided by the product of the mesh axes its logical axis
maps to, through `ShardingRules.spec` (a mesh axis is used at most once per array). Parameters must
divide exactly (a config error names the parameter, as `rules.param_shardings` does); an activation
dimension that does not divide stays unsharded, as `ActivationSharding.constrain` does (noted in
the report).

Items per model:
  params      = sum over parameters of prod(local shape) * p
  grads       = 2 * N_local * g                     (trainable only; g = optimizer.grad_dtype: the
                accumulator over micro-batches and one micro-batch's gradient, live together in
                the scan body. The train step sums in the params' dtype (zeros_like(params)), so
                a view of a train config uses param_dtype)
  optimizer   = N_local * (2 s + m)                 (trainable only; AdamW mu and nu in state_dtype (the
                train step: param_dtype), plus a master copy in master_dtype when it differs from
                param_dtype (the train step keeps none); m = 0 otherwise)
  kv_cache    = L * 2 * R_l * S * K_l * D * a       (student only: rollout sampling; R = the engine's
                decode slots (batch.decode_slots; 0: half the rollout rows, rollout/slots.py) over
                `batch`, K over `act_kv_heads`, S over `cache_seq`)
  prefill     = the prompt pass of the rollout: see `prefill_bytes` (student only)
  sampler_weights = N_local * a                     (student only, when param_dtype != dtype: the
                sampler's weights cast to the compute dtype)
  activations = see `activation_bytes` (micro-batch Bm over `batch`)
  logits      = Bm_l * C * V_l * 4 * (2 if trainable else 1)   (fp32 logits chunk, and its gradient)

Verdict. Params and optimizer state stay resident; the other items live in one phase each:
  rollout (student kv_cache + prefill + sampler_weights), evaluation (the same for the in-run
  evaluator's sampler call: eval_kv_cache + eval_prefill + eval_sampler_weights), teacher scoring
  (teacher activations + logits),
  train step (student grads + activations + logits).
  peak = resident + max(phase totals); fits = peak <= device_memory_gb GiB.
The sum of every item (nothing freed between phases) is reported too, as an upper bound.
Not counted: FSDP all-gather buffers of one layer's weights, the sampler's per-step logits, XLA
temporaries and fragmentation, the runtime's reserved memory: keep some headroom.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from tgpo_jax.bundled import resolve_config
from tgpo_jax.configtree import ConfigError, apply_overrides, from_dict, load_yaml
from tgpo_jax.models.config import ModelConfig, ModelConfigError
from tgpo_jax.models.params import param_specs
from tgpo_jax.sharding.mesh import MeshConfig, ShardingConfigError
from tgpo_jax.sharding.rules import ShardingRules

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
REMAT_MODES = ("full", "attn_out", "none")  # full / attn_out: ModelConfig.remat_policy nothing / attn_out
ATTENTION_KINDS = ("materialized", "flash")


class EstimateConfigError(ConfigError):
    """An estimate config that is malformed (unknown key, wrong type, impossible batch)."""


# ------------------------------------------------------------------------------------------ config
# The estimator reads an EstimateConfig: the arithmetic's view of a run (model shapes, dtypes, rules,
# batch shape, mesh, target hardware). `tgpo-jax estimate` builds it from a train config plus the
# target's hardware (`from_train_config`); the view can also be written out directly, with each
# model's config.json fields inline, for a model that has no directory here.
@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model: its HF config (a path to config.json / its directory, or the inline dict)."""

    hf_config: str | None = None
    hf: dict | None = None
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"
    rules: ShardingRules = ShardingRules()  # in YAML: overrides of DEFAULT_RULES, as in a train config
    trainable: bool = True  # the teacher section defaults to false

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig.from_hf_dict(self.hf or {}, param_dtype=self.param_dtype, dtype=self.dtype)
        except KeyError as e:
            raise EstimateConfigError(f"the model's config.json fields lack {e.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    rollout_batch: int = 1024  # sequences per iteration (prompts x n)
    micro_batch: int = 8  # sequences per micro-batch in the train step
    prompt_len: int = 1024
    response_len: int = 8192
    logits_chunk: int = 1024  # tokens per chunk when computing log-probs over the vocab
    score_micro_batch: int = 0  # sequences per micro-batch of teacher scoring; 0 = micro_batch
    samples_per_prompt: int = 8  # rollout.n: the sampler prefills rollout_batch / n prompts
    # rollout.slots: the engine's decode slots, the KV cache's rows (0: auto, half the rows of each
    # sampling call, rounded up to the batch shards; rollout/slots.py)
    decode_slots: int = 0
    # the in-run evaluation's sampler call (0 prompts: no evaluation): prompts x k rows of
    # eval_prompt_len + eval_response_len slots
    eval_prompts: int = 0
    eval_k: int = 1
    eval_prompt_len: int = 1024
    eval_response_len: int = 8192


@dataclasses.dataclass(frozen=True)
class OptimizerMemory:
    """The dtypes of the optimizer's per-parameter buffers (not train.step.OptimizerConfig, the
    update rule's settings): the train step keeps all of them in the student's param_dtype."""

    state_dtype: str = "float32"  # AdamW's two moments
    master_dtype: str | None = "float32"  # null: no master copy
    grad_dtype: str = "float32"  # the gradient accumulator


@dataclasses.dataclass(frozen=True)
class EstimateConfig:
    mesh: MeshConfig  # in YAML {axis: size}, as a train config's sharding.mesh
    num_devices: int
    student: ModelEntry
    teacher: ModelEntry | None = None
    device_memory_gb: float | None = None  # per-device HBM in GiB (v4 32, v5e 16, v5p 95)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    optimizer: OptimizerMemory = dataclasses.field(default_factory=OptimizerMemory)
    remat: str = "full"  # full | attn_out | none
    # materialized: fp32 [T, S] scores per head (kernels.reference, the einsum path);
    # flash: a blockwise kernel keeping only the logsumexp per query (splash, cudnn; `attention_kind`)
    attention: str = "materialized"


@dataclasses.dataclass(frozen=True)
class TargetHardware:
    """The `estimate:` section of a train config given to `tgpo-jax estimate` (flags override it):
    the target machine, and the estimator's choices the train config does not settle."""

    num_devices: int | None = None  # required here or as --num-devices
    device_memory_gb: float | None = None  # per-device HBM in GiB; none: no verdict
    remat: str | None = None  # default: models.remat_policy (attn_out -> attn_out, else full)
    attention: str | None = None  # default: `attention_kind` of models.attn_impl on `platform`
    platform: str | None = None  # tpu | gpu | cpu: resolves models.attn_impl auto (none: not flash)
    # where each model's config.json is read when models.student / models.teacher is no directory here
    student_hf_config: str | None = None
    teacher_hf_config: str | None = None


def load_estimate_config(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    num_devices: int | None = None,
    device_memory_gb: float | None = None,
    overrides: list[str] | None = None,
) -> EstimateConfig:
    """A train config (with an `estimate:` section or the flags' hardware) or the estimator's view
    written out, from a YAML file or its dict; `hf_config` / model directories are read relative to
    the YAML's directory, else the cwd. Every config error is raised before any arithmetic."""
    base = "."
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = resolve_config(os.fspath(source))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"estimate config not found: {path}")
        base, data = os.path.dirname(os.path.abspath(path)), load_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    flags = {k: v for k, v in (("num_devices", num_devices), ("device_memory_gb", device_memory_gb)) if v is not None}
    try:
        if _is_train_config(data):
            cfg = _from_train_dict(data, flags, base)
        else:
            cfg = _from_view_dict({**data, **flags}, base)
    except (ShardingConfigError, EstimateConfigError):
        raise
    except ConfigError as e:
        raise EstimateConfigError(str(e)) from None
    validate(cfg)
    return cfg


def _is_train_config(data: dict) -> bool:
    from tgpo_jax.train.config import TrainConfig

    view_keys = {f.name for f in dataclasses.fields(EstimateConfig)}
    return "estimate" in data or bool(set(data) & ({f.name for f in dataclasses.fields(TrainConfig)} - view_keys))


def _from_view_dict(data: dict, base: str) -> EstimateConfig:
    if isinstance(data.get("teacher"), dict):
        data["teacher"] = {"trainable": False, **data["teacher"]}
    cfg = from_dict(EstimateConfig, data)
    return dataclasses.replace(
        cfg,
        student=_read_hf(cfg.student, "student", base),
        teacher=cfg.teacher and _read_hf(cfg.teacher, "teacher", base),
    )


def _from_train_dict(data: dict, flags: dict, base: str) -> EstimateConfig:
    """A train config's dict (its `estimate:` section split off and overridden by the flags)."""
    from tgpo_jax.train.config import load_train_config

    data = dict(data)
    section = {**(data.pop("estimate", None) or {}), **flags}
    hw = from_dict(TargetHardware, section, "estimate")
    if hw.num_devices is None:
        raise EstimateConfigError("estimate.num_devices: the target's device count is required (or --num-devices)")
    train = load_train_config(data)
    m = train.models
    hint = " (for a model not here, give estimate.student_hf_config: a config.json or its directory)"
    student = _read_hf(ModelEntry(hf_config=hw.student_hf_config or m.student), "models.student", base, hint).hf
    teacher = None
    if m.teacher or hw.teacher_hf_config:
        entry = ModelEntry(hf_config=hw.teacher_hf_config or m.teacher)
        teacher = _read_hf(entry, "models.teacher", base, hint.replace("student", "teacher")).hf
    return from_train_config(train, hw, student, teacher)


def hf_attention_impl(hf: dict, attn_impl: str, platform: str, dtype: str) -> str:
    """The cache-free attention kernel a model with config.json `hf` runs on `platform`
    (kernels.resolve on an unsharded layer)."""
    from tgpo_jax.kernels import resolve

    H = hf["num_attention_heads"]
    q_shape = (1, 1, H, hf.get("head_dim") or hf["hidden_size"] // H)
    return resolve(attn_impl, platform, None, q_shape, q_shape, dtype)


def attention_kind(attn_impl: str, platform: str | None, hf_configs: list[dict], dtype: str) -> str:
    """ "flash" where every model's cache-free attention resolves to a blockwise kernel (splash,
    cudnn, the fused CPU kernel) on `platform` (`hf_attention_impl`), else "materialized"."""
    flash = {"splash", "cudnn", "cpu"}
    if attn_impl != "auto" or not platform:
        return "flash" if attn_impl in flash else "materialized"
    if all(hf_attention_impl(hf, "auto", platform, dtype) in flash for hf in hf_configs):
        return "flash"
    return "materialized"


def from_train_config(train, hw: TargetHardware, student_hf: dict, teacher_hf: dict | None = None) -> EstimateConfig:
    """The estimator's view of TrainConfig `train` on `hw`, with each model's config.json fields.
    The train step keeps params, gradients and AdamW moments in the student's param_dtype (no
    separate master copy); the teacher is frozen; a prompt takes data.max_prompt_len tokens."""

    m, shard = train.models, train.sharding
    student = ModelEntry(hf=student_hf, param_dtype=m.param_dtype, dtype=m.dtype, rules=shard.student_rules)
    teacher = teacher_hf and ModelEntry(
        hf=teacher_hf,
        param_dtype=m.teacher_param_dtype or m.param_dtype,
        dtype=m.teacher_dtype or m.dtype,
        rules=shard.teacher_rules,
        trainable=False,
    )
    batch = BatchConfig(
        rollout_batch=train.rollout_batch,
        micro_batch=train.train.micro_batch,
        score_micro_batch=train.train.score_micro_batch,  # 0 = micro_batch, here as in the train config
        prompt_len=train.max_prompt_len,
        response_len=train.rollout.max_new_tokens,
        logits_chunk=train.train.logprob_chunk,
        samples_per_prompt=train.rollout.n,
        decode_slots=train.rollout.slots,
        **_eval_batch(train),
    )
    return EstimateConfig(
        mesh=shard.mesh,
        num_devices=hw.num_devices,
        student=student,
        teacher=teacher,
        device_memory_gb=hw.device_memory_gb,
        batch=batch,
        optimizer=OptimizerMemory(state_dtype=m.param_dtype, master_dtype=None, grad_dtype=m.param_dtype),
        remat=hw.remat or ("attn_out" if m.remat_policy == "attn_out" else "full"),
        attention=hw.attention
        or attention_kind(m.attn_impl, hw.platform, [student_hf] + ([teacher_hf] if teacher_hf else []), m.dtype),
    )


def _eval_batch(train) -> dict:
    """BatchConfig's eval_* fields for the in-run evaluation of `train` (none without an eval set)."""

    if not (train.eval.data and train.eval.every > 0):
        return {}
    return dict(
        eval_prompts=train.eval_batch_prompts,
        eval_k=train.eval.k,
        eval_prompt_len=train.eval_max_prompt_len,
        eval_response_len=train.eval.max_new_tokens,
    )


def _read_hf(entry: ModelEntry, role: str, base: str, hint: str = "") -> ModelEntry:
    """Fills `entry.hf` from `hf_config` (a config.json or a directory holding one; a bundled
    `configs/hf_configs/...` path is found in the package)."""
    if (entry.hf is None) == (entry.hf_config is None):
        raise EstimateConfigError(
            f"{role}: give exactly one of hf_config (a path to config.json) or hf (its fields inline)"
        )
    if entry.hf is not None:
        return entry
    path = entry.hf_config
    if not os.path.isabs(path) and os.path.exists(os.path.join(base, path)):
        path = os.path.join(base, path)
    path = resolve_config(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role}: no config.json at {entry.hf_config}{hint}")
    try:
        with open(path) as f:
            return dataclasses.replace(entry, hf=json.load(f))
    except json.JSONDecodeError as e:
        raise EstimateConfigError(f"{role}: {path} is not valid JSON: {e}") from None


# -------------------------------------------------------------------------------------- validation
@dataclasses.dataclass(frozen=True)
class _Model:
    role: str
    entry: ModelEntry
    cfg: ModelConfig
    rules: ShardingRules
    shards: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # path -> (global shape, local shape)


def validate(cfg: EstimateConfig) -> tuple[dict[str, int], list[_Model]]:
    """Every config error, before any arithmetic: values, mesh vs num_devices, rules' axis names,
    parameter divisibility. Returns the resolved mesh sizes and the prepared models."""
    _check_values(cfg)
    mesh = cfg.mesh
    sizes = dict(zip(mesh.names, mesh.resolve(cfg.num_devices)))
    models = [_prepare("student", cfg.student, sizes)]
    if cfg.teacher is not None:
        models.append(_prepare("teacher", cfg.teacher, sizes))
    return sizes, models


def _check_values(cfg: EstimateConfig) -> None:
    def one_of(where, v, accepted):
        if v not in accepted:
            raise EstimateConfigError(f"{where}={v!r}; accepted: {', '.join(accepted)}")

    for role, e in (("student", cfg.student), ("teacher", cfg.teacher)):
        if e is not None:
            one_of(f"{role}.param_dtype", e.param_dtype, DTYPE_BYTES)
            one_of(f"{role}.dtype", e.dtype, DTYPE_BYTES)
    o = cfg.optimizer
    one_of("optimizer.state_dtype", o.state_dtype, DTYPE_BYTES)
    one_of("optimizer.grad_dtype", o.grad_dtype, DTYPE_BYTES)
    if o.master_dtype is not None:
        one_of("optimizer.master_dtype", o.master_dtype, DTYPE_BYTES)
    one_of("remat", cfg.remat, REMAT_MODES)
    one_of("attention", cfg.attention, ATTENTION_KINDS)
    for k, v in [("num_devices", cfg.num_devices)] + [
        (f"batch.{k}", v)
        for k, v in dataclasses.asdict(cfg.batch).items()
        if k not in ("score_micro_batch", "eval_prompts", "decode_slots")  # 0: as micro_batch / none / auto
    ]:
        if v < 1:
            raise EstimateConfigError(f"{k}={v} must be a positive integer")
    if cfg.device_memory_gb is not None and cfg.device_memory_gb <= 0:
        raise EstimateConfigError(f"device_memory_gb={cfg.device_memory_gb} must be positive")
    if cfg.batch.rollout_batch % cfg.batch.micro_batch:
        raise EstimateConfigError(
            f"batch.micro_batch={cfg.batch.micro_batch} does not divide batch.rollout_batch={cfg.batch.rollout_batch}"
        )
    if cfg.batch.score_micro_batch < 0 or cfg.batch.rollout_batch % _rows(cfg.batch, trainable=False):
        raise EstimateConfigError(
            f"batch.score_micro_batch={cfg.batch.score_micro_batch} must be 0 (= micro_batch) or divide "
            f"batch.rollout_batch={cfg.batch.rollout_batch}"
        )


def _prepare(role: str, entry: ModelEntry, sizes: dict[str, int]) -> _Model:
    try:
        mcfg = entry.model_config()
        rules = _rules(entry.rules, sizes)
        shards = param_shard_shapes(mcfg, rules, sizes)
    except (ShardingConfigError, ModelConfigError, EstimateConfigError) as e:
        raise type(e)(f"{role}: {e}") from None
    return _Model(role, entry, mcfg, rules, shards)


def _rules(rules: ShardingRules, sizes: dict[str, int]) -> ShardingRules:
    """The mesh-axis check of ShardingRules.validate, with mesh sizes instead of a Mesh."""
    for logical, axes in rules.table:
        for a in (axes,) if isinstance(axes, str) else tuple(axes or ()):
            if a not in sizes:
                raise ShardingConfigError(
                    f"sharding rule {logical} -> {a!r} names an axis the mesh does not have; "
                    f"mesh axes: {', '.join(sizes)}"
                )
    return rules


def _axes_size(entry, sizes: Mapping[str, int]) -> int:
    """Devices a PartitionSpec entry (None, an axis name or a tuple of them) shards over."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(sizes[n] for n in names)


def param_shard_shapes(cfg: ModelConfig, rules: ShardingRules, sizes: Mapping[str, int]):
    """{path: (global shape, per-device shape)}; the same spec and divisibility check (and error
    message) as `rules.param_shardings`, with mesh sizes instead of a Mesh."""
    out = {}
    for path, spec in param_specs(cfg).items():
        pspec = rules.spec(spec.axes)
        local = []
        for dim, (size, entry, logical) in enumerate(zip(spec.shape, pspec, spec.axes)):
            n = _axes_size(entry, sizes)
            if size % n:
                raise ShardingConfigError(
                    f"parameter {path} dim {dim} ({logical}={size}) is not divisible by mesh axes {entry} "
                    f"of size {n}; change the rule for {logical!r} (e.g. to null) or the mesh"
                )
            local.append(-(-size // n))
        out[path] = (tuple(spec.shape), tuple(local))
    return out


# ------------------------------------------------------------------------------------------ arithmetic
def _local(m: _Model, sizes, logical: tuple, shape: tuple[int, ...], what: str, notes: list[str]) -> tuple[int, ...]:
    """Per-device shape of an activation: each dim divided by its mesh axes (via rules.spec);
    a dim that does not divide stays whole, as ActivationSharding.constrain leaves it."""
    out = []
    for size, entry, name in zip(shape, m.rules.spec(logical), logical):
        n = _axes_size(entry, sizes)
        if size % n:
            notes.append(
                f"{m.role}: {what} {name}={size} does not divide mesh axes {entry} ({n}); kept whole on each device"
            )
            n = 1
        out.append(size // n)
    return tuple(out)


def kv_cache_bytes(m: _Model, b: BatchConfig, sizes, notes: list[str], rows: int = 0, S: int = 0) -> int:
    """L * 2 (k, v) * R_l * S * K_l * D * a: the engine's cache for a sampling call of `rows`
    requests (default the rollout batch): R = its decode slots (rollout/slots.engine_slots), of S
    slots each (default prompt_len + response_len) (KVCache.init: L buffers of [R, K, S, D], or one
    [L, R, K, S, D], in the compute dtype)."""
    from tgpo_jax.rollout.slots import engine_slots

    c = m.cfg
    shards = _axes_size(m.rules.spec(("batch",))[0], sizes)
    R = engine_slots(rows or b.rollout_batch, b.decode_slots, shards)
    shape = (c.num_layers, R, S or b.prompt_len + b.response_len, c.num_kv_heads, c.head_dim)
    local = _local(m, sizes, (None, "batch", "cache_seq", "act_kv_heads", None), shape, "kv cache", notes)
    return 2 * math.prod(local) * DTYPE_BYTES[c.dtype]


def _rows(b: BatchConfig, trainable: bool) -> int:
    """Sequences per micro-batch: the train step's (trainable) or teacher scoring's."""
    return b.micro_batch if trainable else b.score_micro_batch or b.micro_batch


def _act_dims(m: _Model, b: BatchConfig, sizes, notes: list[str], rows: int = 0, T: int = 0) -> dict[str, int]:
    """Per-device B (`rows`, default the micro-batch rows `_rows`), T (`T`, default the whole
    sequence), E, H, K, F under the model's activation rules."""
    c, T = m.cfg, T or b.prompt_len + b.response_len
    shape = (rows or _rows(b, m.entry.trainable), T, c.hidden_size)
    B, Tl, E = _local(m, sizes, ("batch", "seq", "act_embed"), shape, "activation", notes)
    H = _local(m, sizes, (None, None, "act_heads"), (1, 1, c.num_heads), "activation", notes)[2]
    K = _local(m, sizes, (None, None, "act_kv_heads"), (1, 1, c.num_kv_heads), "activation", notes)[2]
    F = _local(m, sizes, (None, None, "act_mlp"), (1, 1, c.intermediate_size), "activation", notes)[2]
    return dict(B=B, T=Tl, Tk=T, E=E, H=H, K=K, F=F, D=c.head_dim)


def moe_working_set(c: ModelConfig, d: Mapping[str, int], a: int) -> int:
    """A sparse layer's MLP intermediates (models/moe.py, the sorted-rows paths: ragged / blocks), with
    N = B*T local tokens, k experts per token, A = N*k assignments, X experts, M expert width:
      W_moe = N*X*4 + A*8 + A*(2E + 3M)*a: fp32 router probs [N, X]; the routing weight and id of
      each assignment (8 bytes); in the compute dtype a, the expert-sorted token copy and its
      output [A, E] (2E) and gate, up and silu(gate)*up [A, M] (3M).
    Every local assignment is counted, also under expert parallelism (each expert shard sorts all
    of its tokens' assignments, the other shards' ones masked)."""
    N = d["B"] * d["T"]
    A = N * c.num_experts_per_tok
    return N * c.num_experts * 4 + A * 8 + A * (2 * d["E"] + 3 * c.moe_intermediate_size) * a


def layer_working_set(
    d: Mapping[str, int],
    a: int,
    attention: str,
    moe: int | None = None,
    dense_mlp: bool = True,
    forward_only: bool = False,
) -> int:
    """One decoder layer's forward intermediates, W = a*B*T*(2E + 2H*D + 2K*D + 3F) + A:
    2E the two RMSNorm outputs, 2H*D q and the attention output, 2K*D k and v, 3F gate, up and
    silu(gate)*up; A the attention scores with Tk = the full key length:
      materialized: A = B*H*T*Tk*(4 + a)  (fp32 scores + probs in the compute dtype, kernels.reference);
                    forward only (no backward keeps the probs) B*H*T*Tk*4: the TPU compiler fuses the
                    softmax into the probs @ v product and holds the fp32 scores alone
      flash:        A = B*H*T*4           (a blockwise kernel keeps only the fp32 logsumexp per query)
    For a mixture-of-experts model the MLP term is max(moe_working_set, a*B*T*3F if the model also
    has dense layers (mlp_only_layers / decoder_sparse_step) else 0): the larger layer kind counts."""
    B, T, E, H, K, F, D = (d[k] for k in "BTEHKFD")
    attn = B * H * T * d["Tk"] * (4 + (0 if forward_only else a)) if attention == "materialized" else B * H * T * 4
    mlp = a * B * T * 3 * F if dense_mlp else 0
    if moe is not None:
        mlp = max(moe, mlp)
    return a * B * T * (2 * E + 2 * H * D + 2 * K * D) + mlp + attn


def activation_bytes(m: _Model, cfg: EstimateConfig, sizes, notes: list[str]) -> int:
    """Train step (trainable) or teacher scoring forward (not trainable) over one micro-batch,
    with r = B*T*E*a one residual [B, T, E] and W = layer_working_set:
      trainable, remat full: L*r + 2W      (the scan saves each layer's input; backward recomputes one
                                            layer and holds its intermediates' gradients, ~W)
      trainable, remat attn_out: L*(r + o) + 2W, o = B*T*H*D*a (each layer's attention output kept too)
      trainable, remat none: L*(r + W) + W (every layer's intermediates saved + one layer's gradients)
      not trainable:         r + W         (no grad: the running residual and one layer)"""
    d = _act_dims(m, cfg.batch, sizes, notes)
    a = DTYPE_BYTES[m.cfg.dtype]
    r = d["B"] * d["T"] * d["E"] * a
    moe = moe_working_set(m.cfg, d, a) if m.cfg.moe_layer_ids else None
    dense = not m.cfg.is_moe or bool(m.cfg.dense_mlp_layer_ids)
    w = layer_working_set(d, a, cfg.attention, moe, dense_mlp=dense, forward_only=not m.entry.trainable)
    L = m.cfg.num_layers
    if not m.entry.trainable:
        return r + w
    if cfg.remat == "none":
        return L * (r + w) + w
    o = d["B"] * d["T"] * d["H"] * d["D"] * a if cfg.remat == "attn_out" else 0
    return L * (r + o) + 2 * w


def prefill_bytes(m: _Model, cfg: EstimateConfig, sizes, notes: list[str], prompts: int = 0, T: int = 0) -> int:
    """The sampler's prompt pass: P prompts (default rollout_batch / n) of T tokens (default
    prompt_len), forward only, r + W (activation_bytes' forward form with B = P_l, T = Tk), plus the
    prompts' own cache L * 2 * P_l * T * K_l * D * a before it is copied to the samples' rows."""
    b, c = cfg.batch, m.cfg
    prompts = prompts or max(1, b.rollout_batch // max(b.samples_per_prompt, 1))
    T = T or b.prompt_len
    d = _act_dims(m, b, sizes, notes, rows=prompts, T=T)
    d["Tk"] = T
    a = DTYPE_BYTES[c.dtype]
    moe = moe_working_set(c, d, a) if c.moe_layer_ids else None
    dense = not c.is_moe or bool(c.dense_mlp_layer_ids)
    w = layer_working_set(d, a, cfg.attention, moe, dense_mlp=dense, forward_only=True)
    cache = c.num_layers * 2 * d["B"] * d["T"] * d["K"] * d["D"] * a
    return d["B"] * d["T"] * d["E"] * a + w + cache


def logits_bytes(m: _Model, b: BatchConfig, sizes, notes: list[str]) -> int:
    """Bm_l * C * V_l * 4 (fp32), x2 when trainable (the chunk's gradient); C = min(logits_chunk, response_len)."""
    shape = (_rows(b, m.entry.trainable), min(b.logits_chunk, b.response_len), m.cfg.vocab_size)
    local = _local(m, sizes, ("batch", "seq", "act_vocab"), shape, "logits", notes)
    return math.prod(local) * 4 * (2 if m.entry.trainable else 1)


def model_items(m: _Model, cfg: EstimateConfig, sizes, notes: list[str]) -> dict[str, int]:
    """Bytes per device for each item of one model (see the module docstring)."""
    n_local = sum(math.prod(local) for _, local in m.shards.values())
    items = {"params": n_local * DTYPE_BYTES[m.entry.param_dtype]}
    if m.entry.trainable:
        o = cfg.optimizer
        master = o.master_dtype is not None and o.master_dtype != m.entry.param_dtype
        # two gradient-sized trees: the accumulator and, inside the micro-batch scan, the micro-batch's
        # own gradient before it is added (the train step's scan body holds both)
        items["grads"] = 2 * n_local * DTYPE_BYTES[o.grad_dtype]
        items["optimizer"] = n_local * (2 * DTYPE_BYTES[o.state_dtype] + (DTYPE_BYTES[o.master_dtype] if master else 0))
    if m.role == "student":
        items["kv_cache"] = kv_cache_bytes(m, cfg.batch, sizes, notes)
        items["prefill"] = prefill_bytes(m, cfg, sizes, notes)
        if m.entry.param_dtype != m.cfg.dtype:  # the sampler reads its weights cast once to the compute dtype
            items["sampler_weights"] = n_local * DTYPE_BYTES[m.cfg.dtype]
        b = cfg.batch
        if b.eval_prompts:
            S = b.eval_prompt_len + b.eval_response_len
            items["eval_kv_cache"] = kv_cache_bytes(m, b, sizes, notes, rows=b.eval_prompts * b.eval_k, S=S)
            items["eval_prefill"] = prefill_bytes(m, cfg, sizes, notes, prompts=b.eval_prompts, T=b.eval_prompt_len)
            if "sampler_weights" in items:  # the evaluation's sampler casts its own copy
                items["eval_sampler_weights"] = items["sampler_weights"]
    items["activations"] = activation_bytes(m, cfg, sizes, notes)
    items["logits"] = logits_bytes(m, cfg.batch, sizes, notes)
    return items


# ------------------------------------------------------------------------------------------ result
RESIDENT = ("params", "optimizer")


def phase_of(role: str, item: str) -> str:
    """Which phase an item lives in (params / optimizer state are resident: 'resident')."""
    if item in RESIDENT:
        return "resident"
    if item in ("kv_cache", "prefill", "sampler_weights"):
        return "rollout"
    if item in ("eval_kv_cache", "eval_prefill", "eval_sampler_weights"):
        return "evaluation"
    return "train step" if role == "student" or item == "grads" else "teacher scoring"


@dataclasses.dataclass(frozen=True)
class ModelEstimate:
    role: str
    architecture: str
    n_params: int  # global
    param_dtype: str
    trainable: bool
    items: dict[str, int]  # bytes per device

    @property
    def total(self) -> int:
        return sum(self.items.values())


@dataclasses.dataclass(frozen=True)
class Estimate:
    mesh: dict[str, int]
    num_devices: int
    models: dict[str, ModelEstimate]
    phases: dict[str, int]  # 'resident' and each phase's transient bytes per device
    capacity_bytes: int | None
    notes: tuple[str, ...] = ()

    @property
    def sum_bytes(self) -> int:
        """Every item at once (nothing freed between phases): an upper bound."""
        return sum(m.total for m in self.models.values())

    @property
    def peak_bytes(self) -> int:
        """resident + the largest phase: what the verdict uses."""
        return self.phases["resident"] + max((v for k, v in self.phases.items() if k != "resident"), default=0)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_bytes is None else self.peak_bytes <= self.capacity_bytes

    def biggest(self, n: int = 3) -> list[tuple[str, int]]:
        all_items = [(f"{r} {k}", v) for r, m in self.models.items() for k, v in m.items.items()]
        return sorted(all_items, key=lambda kv: -kv[1])[:n]

    def verdict(self) -> str:
        if self.capacity_bytes is None:
            return "no device memory given (estimate.device_memory_gb / --device-memory-gb): no verdict"
        if self.fits:
            return f"fits: needs {gib(self.peak_bytes)} GiB of {gib(self.capacity_bytes)} GiB per device"
        top = ", ".join(f"{k} {gib(v)} GiB" for k, v in self.biggest())
        return (
            f"DOES NOT FIT: needs {gib(self.peak_bytes)} GiB, has {gib(self.capacity_bytes)} GiB per device; "
            f"biggest items: {top}"
        )

    def report(self) -> str:
        return format_report(self)


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def estimate(cfg: EstimateConfig) -> Estimate:
    """Validates `cfg` (raising on any config error before computing) and returns per-device bytes."""
    sizes, models = validate(cfg)
    notes: list[str] = []
    out, phases = {}, {"resident": 0, "rollout": 0, "teacher scoring": 0, "train step": 0, "evaluation": 0}
    for m in models:
        items = model_items(m, cfg, sizes, notes)
        n = sum(math.prod(g) for g, _ in m.shards.values())
        out[m.role] = ModelEstimate(m.role, m.cfg.architecture, n, m.entry.param_dtype, m.entry.trainable, items)
        for k, v in items.items():
            phases[phase_of(m.role, k)] += v
    cap = None if cfg.device_memory_gb is None else int(cfg.device_memory_gb * GIB)
    return Estimate(sizes, cfg.num_devices, out, phases, cap, tuple(dict.fromkeys(notes)))


def format_report(est: Estimate) -> str:
    """A table per model (GiB per device), the totals, the phases and the verdict."""
    mesh = " ".join(f"{k}={v}" for k, v in est.mesh.items())
    lines = [f"mesh: {mesh} ({est.num_devices} devices); GiB per device"]
    for m in est.models.values():
        kind = "trainable" if m.trainable else "frozen"
        lines.append(f"{m.role}: {m.architecture}, {m.n_params / 1e9:.3f}e9 params, {m.param_dtype}, {kind}")
        lines += [f"  {k:<12}{gib(v):>10}" for k, v in m.items.items()]
        lines.append(f"  {'total':<12}{gib(m.total):>10}")
    ph = ", ".join(f"{k} {gib(v)}" for k, v in est.phases.items())
    lines.append(f"all items at once: {gib(est.sum_bytes)} GiB")
    lines.append(f"peak (resident + largest phase): {gib(est.peak_bytes)} GiB  [{ph}]")
    lines += [f"note: {n}" for n in est.notes]
    lines.append(est.verdict())
    return "\n".join(lines)
