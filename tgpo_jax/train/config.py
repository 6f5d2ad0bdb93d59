"""The full, serialisable training config: one typed dataclass tree, validated before anything
is loaded or compiled. `load_train_config(path, overrides)` is the only entry point the CLI uses."""

from __future__ import annotations

import dataclasses
from typing import Any

from tgpo_jax.configtree import ConfigError, apply_overrides, from_dict, load_yaml
from tgpo_jax.data.config import DataSection
from tgpo_jax.models.config import DTYPES
from tgpo_jax.models.runtime_options import runtime_option_problems
from tgpo_jax.models.vocab_map import DEFAULT_TEACHER_OOV, TEACHER_OOV_MODES
from tgpo_jax.objectives.registry import ObjectiveConfig
from tgpo_jax.rewards.reward_fn import RewardConfig
from tgpo_jax.rollout.sampling import SamplingParams, sampling_problems
from tgpo_jax.sharding.distributed import DistributedConfig, DistributedConfigError, plan
from tgpo_jax.sharding.mesh import MeshConfig
from tgpo_jax.sharding.rules import ShardingRules
from tgpo_jax.train.step import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class ModelPairConfig:
    """The `models:` section: the student / teacher directories and both models' runtime options
    (the architecture of each is models.config.ModelConfig, read from its config.json)."""

    student: str = ""  # local HF directory
    teacher: str | None = None  # local HF directory; required by teacher objectives
    tokenizer: str | None = None  # default: the student's directory
    param_dtype: str = "float32"
    dtype: str = "float32"
    teacher_param_dtype: str | None = None
    teacher_dtype: str | None = None
    allow_tokenizer_mismatch: bool = False
    # A teacher target id (argmax, sample, top-K entry) the student's tokenizer cannot produce, e.g.
    # Qwen3's </think> for a Qwen2.5 student: map (to the student's first piece of its text) |
    # mask (out of the teacher terms) | shared (kept as the id, the authors' behaviour; the student
    # then samples from every embedding row). models/vocab_map.py, docs/vocab.md.
    teacher_oov: str = DEFAULT_TEACHER_OOV
    # Runtime kernels of both models' cache-free forward (training, scoring); see ModelConfig.
    # einsum | sdpa | cudnn (cuDNN flash attention, GPU only) | cpu (fused C++ kernel, fp32) |
    # auto (cpu where it applies on CPU devices, per shard on a mesh; else einsum)
    attn_impl: str = "auto"
    attn_query_block: int = -1  # > 0: causal attention in query blocks of this many rows; 0: off; -1: auto (CPU only)
    cache_layers: str = "auto"  # the sampler's KV cache: unroll | scan (compile time flat in depth) | auto
    remat_policy: str = "auto"  # what the train step's layer recomputation keeps: nothing | attn_out | auto

    def model_overrides(self) -> dict:
        return {
            "attn_impl": self.attn_impl,
            "attn_query_block": self.attn_query_block,
            "cache_layers": self.cache_layers,
            "remat_policy": self.remat_policy,
        }


@dataclasses.dataclass(frozen=True)
class ShardingSection:
    # In YAML the mesh is `{axis: size}` and each rules key holds only the overrides of DEFAULT_RULES
    # (configtree's from_config / to_config hooks), so config.json keeps that form.
    mesh: MeshConfig = MeshConfig()
    student_rules: ShardingRules = ShardingRules()
    teacher_rules: ShardingRules = ShardingRules()
    # Multi-process start-up: coordinator_address ("host:port" of process 0), num_processes and
    # process_id together, or none (single process; on a Cloud TPU VM JAX detects them). Unset
    # fields are read from the environment (TGPO_COORDINATOR_ADDRESS, TGPO_NUM_PROCESSES, ...).
    distributed: DistributedConfig = DistributedConfig()


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    prompts_per_iteration: int = 128
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 8192
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    stop_ids: tuple[int, ...] = ()
    # Decode slots of the continuous-batching engine (rollout/engine.py): a finished row's slot goes
    # to the next pending sample, so the decode steps follow the total length, not the longest
    # answer; every sampling call (rollouts, the in-run evaluator, `tgpo-jax eval` / `sample`) runs
    # it. 0: auto, half the rollout rows rounded up to the batch shards (rollout/slots.py).
    slots: int = 0
    # The engine's paged KV cache (rollout/paged_engine.py): a pool of kv_pages pages per layer of
    # page_size tokens shared by the slots, taken as rows grow and returned when a request stops,
    # so it is sized by the tokens in flight. 0: a dense row of prompt + max_new_tokens per slot.
    kv_pages: int = 0
    page_size: int = 128


@dataclasses.dataclass(frozen=True)
class TrainSection:
    iterations: int = 300
    mini_batches: int = 2  # optimizer steps per iteration (one epoch over the rollout batch)
    micro_batch: int = 8  # sequences per gradient-accumulation step
    # Rows per micro-batch of the score step (student and teacher forward over the rollout batch,
    # one micro-batch at a time); 0 = micro_batch: the scoring forward keeps no activations for a
    # backward pass, so it fits wherever a train micro-batch does. Must divide the rollout batch.
    score_micro_batch: int = 0
    # > 0 (objective.loss_agg microbatch_sum only): the authors' dynamic micro-batches (veRL
    # use_dynamic_bsz with ppo_max_token_len_per_gpu = this many prompt + response tokens; theirs:
    # 16384). Each row's loss is divided by the response tokens of the micro-batch their split puts
    # it in (objectives/token_budget.py), so the loss is theirs whatever train.micro_batch is. 0: off.
    micro_batch_tokens: int = 0
    # The data-parallel ranks the authors spread a mini-batch over (theirs: 8 GPUs): each rank
    # splits its own rows and the gradients are averaged over ranks. Only with micro_batch_tokens.
    micro_batch_ranks: int = 1
    logprob_chunk: int = 256
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RewardsSection:
    """The `rewards:` section; the grader's own settings (rewards.RewardConfig) derive from it."""

    think_format: bool = True
    timeout_s: float = 5.0
    workers: int = 2

    def reward_config(self, base: RewardConfig | None = None) -> RewardConfig:
        """`base` (default RewardConfig()) with this section's think_format, timeout and workers."""
        return dataclasses.replace(
            base or RewardConfig(), think_format=self.think_format, timeout_s=self.timeout_s, num_workers=self.workers
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # Sampled with train.seed and the rollout stop ids, through the policy `tgpo-jax eval` uses: the
    # same random numbers at every evaluation (iterations differ only by the model), and an exported
    # checkpoint scores the same under `tgpo-jax eval --seed <train.seed> --batch-size <b>`, with
    # b = min(TrainConfig.eval_batch_prompts, eval items) (the draws depend on the batch size).
    every: int = 20  # iterations; 0 = never
    k: int = 1
    # Prompts per sampler call (each with k rows and a max_new_tokens KV cache); 0 = no more
    # prompts than a rollout prefills and no more rows than it samples,
    # max(1, min(prompts_per_iteration, prompts_per_iteration x n // k)): that batch fits (at
    # equal lengths). More prompts than a rollout would prefill more at once: the TPU compiler
    # measured 30.1 GiB against the rollout's 28.6 at 256 prompts x k = 1 vs 32 x n = 8.
    batch_size: int = 0
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192
    data: DataSection = dataclasses.field(default_factory=DataSection)  # keys over `data` for the eval set


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50  # iterations; 0 = never
    keep: int = 3
    keep_best: int = 1  # also keep the best checkpoints by eval score
    resume: bool = True
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True
    plot: bool = True
    # every k iterations (1, k + 1, ...), the teacher term's share of the gradient (train/grad_share.py:
    # two extra forward/backward passes over one mini-batch); 0 = never
    grad_share_every: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    models: ModelPairConfig = ModelPairConfig()
    sharding: ShardingSection = ShardingSection()
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainSection = TrainSection()
    data: DataSection = dataclasses.field(default_factory=DataSection)
    rewards: RewardsSection = RewardsSection()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def rollout_batch(self) -> int:
        return self.rollout.prompts_per_iteration * self.rollout.n

    @property
    def mini_batch(self) -> int:
        return self.rollout_batch // self.train.mini_batches

    @property
    def max_prompt_len(self) -> int:
        """The longest prompt the data keeps (data.max_prompt_len or its default)."""
        from tgpo_jax.data import DataConfig

        return int(self.data.get("max_prompt_len", DataConfig.max_prompt_len))

    @property
    def eval_max_prompt_len(self) -> int:
        """The longest prompt the eval set keeps (eval.data over data)."""
        from tgpo_jax.data import DataConfig

        return int({**self.data, **self.eval.data}.get("max_prompt_len", DataConfig.max_prompt_len))

    @property
    def rollout_sampling(self) -> SamplingParams:
        """How the training rollouts sample (the loop's sampler calls and their AOT compile)."""
        r = self.rollout
        return SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            n=r.n,
            stop_ids=r.stop_ids,
        )

    @property
    def eval_sampling(self) -> SamplingParams:
        """How the in-run evaluator samples (k samples per prompt)."""
        e = self.eval
        return SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens, n=e.k)

    @property
    def eval_batch_prompts(self) -> int:
        """Prompts per in-run eval sampler call: eval.batch_size, 0 meaning
        max(1, min(prompts_per_iteration, rollout batch // eval.k))."""
        by_rows = self.rollout_batch // max(self.eval.k, 1)
        return self.eval.batch_size or max(1, min(self.rollout.prompts_per_iteration, by_rows))

    @property
    def score_micro_batch_rows(self) -> int:
        """Rows per score-step micro-batch: train.score_micro_batch, 0 meaning train.micro_batch."""
        return self.train.score_micro_batch or self.train.micro_batch


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks; every problem is named, all at once."""
    p = []
    if not cfg.models.student:
        p.append("models.student: a local HF model directory is required")
    p += [f"models.{problem}" for problem in runtime_option_problems(**cfg.models.model_overrides())]
    m = cfg.models
    for name in ("param_dtype", "dtype", "teacher_param_dtype", "teacher_dtype"):
        value = getattr(m, name)  # the teacher's None means "as the student's"
        if value not in DTYPES and not (value is None and name.startswith("teacher_")):
            p.append(f"models.{name}={value!r}: must be one of {', '.join(DTYPES)}")
    if m.teacher_oov not in TEACHER_OOV_MODES:
        p.append(f"models.teacher_oov={m.teacher_oov!r}: must be one of {', '.join(TEACHER_OOV_MODES)}")
    try:
        plan(cfg.sharding.distributed)
    except DistributedConfigError as e:
        p.append(f"sharding.distributed: {e}")
    obj = cfg.objective.objective
    if obj.needs_teacher and not cfg.models.teacher:
        p.append(f"objective {cfg.objective.name!r} needs a teacher: set models.teacher")
    if obj.group_advantages and cfg.rollout.n < 2:
        p.append(
            f"rollout.n={cfg.rollout.n}: objective {cfg.objective.name!r} uses GRPO group advantages, "
            "which need a group size >= 2"
        )
    p += _range_problems(cfg)
    # the data values now, the data source when the run starts (a config may name its files later)
    p += DataSection(cfg.data).problems("data") + DataSection(cfg.eval.data).problems("eval.data")
    if cfg.train.mini_batches < 1 or cfg.rollout_batch % cfg.train.mini_batches:
        p.append(
            f"train.mini_batches={cfg.train.mini_batches} does not divide the rollout batch "
            f"of {cfg.rollout_batch} (= prompts_per_iteration x n)"
        )
    elif cfg.train.micro_batch < 1 or cfg.mini_batch % cfg.train.micro_batch:
        p.append(
            f"train.micro_batch={cfg.train.micro_batch} does not divide the mini-batch of {cfg.mini_batch} sequences"
        )
    p += _score_micro_batch_problems(cfg)
    p += _token_budget_problems(cfg)
    if cfg.train.logprob_chunk < 1:
        p.append(f"train.logprob_chunk={cfg.train.logprob_chunk}: must be >= 1")
    elif cfg.rollout.max_new_tokens >= 1 and cfg.rollout.max_new_tokens % min(
        cfg.train.logprob_chunk, cfg.rollout.max_new_tokens
    ):
        p.append(
            f"train.logprob_chunk={cfg.train.logprob_chunk} must divide "
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
        )
    if cfg.train.iterations < 1:
        p.append("train.iterations must be >= 1")
    if cfg.objective.objective.offpolicy_rows and not cfg.data.get("solution_column"):
        p.append(f"objective {cfg.objective.name!r} needs off-policy traces: set data.solution_column")
    if len(p) == 1:
        raise ConfigError(f"invalid config: {p[0]}")  # one line: the common case reads as one
    if p:
        raise ConfigError("invalid config:\n  " + "\n  ".join(p))
    return cfg


def _score_micro_batch_problems(cfg: TrainConfig) -> list[str]:
    """train.score_micro_batch: 0 or a divisor of the rollout batch. (0 resolves to train.micro_batch,
    checked above to divide a mini-batch, which divides the rollout batch.)"""
    rows, batch = cfg.train.score_micro_batch, cfg.rollout_batch
    if rows == 0 or (rows >= 1 and batch % rows == 0):
        return []
    return [
        f"train.score_micro_batch={rows}: must be 0 (= train.micro_batch) or a divisor >= 1 of the "
        f"rollout batch of {batch} (= prompts_per_iteration x n)"
    ]


def _token_budget_problems(cfg: TrainConfig) -> list[str]:
    """train.micro_batch_tokens / micro_batch_ranks: the authors' dynamic micro-batches, which only
    exist under their aggregation (sum of micro-batch token means)."""
    t, obj = cfg.train, cfg.objective
    if t.micro_batch_tokens == 0:
        if t.micro_batch_ranks != 1:
            return [f"train.micro_batch_ranks={t.micro_batch_ranks}: only applies with train.micro_batch_tokens > 0"]
        return []
    if t.micro_batch_tokens < 0:
        return [f"train.micro_batch_tokens={t.micro_batch_tokens}: must be >= 0 (0: off)"]
    accepted = "accepted: train.micro_batch_tokens 0 with any loss_agg, or > 0 with objective.loss_agg microbatch_sum"
    if obj.loss_agg != "microbatch_sum":
        return [f"train.micro_batch_tokens={t.micro_batch_tokens} with objective.loss_agg={obj.loss_agg!r}; {accepted}"]
    if obj.objective.offpolicy_rows:
        return [
            f"train.micro_batch_tokens={t.micro_batch_tokens} with objective {obj.name!r}, whose loss is "
            f"sum / T_max per sequence, not per micro-batch; {accepted}, for an objective other than {obj.name!r}"
        ]
    p = []
    longest = cfg.max_prompt_len + cfg.rollout.max_new_tokens
    if t.micro_batch_tokens < longest:  # veRL asserts it too: every sequence fits one micro-batch
        p.append(
            f"train.micro_batch_tokens={t.micro_batch_tokens}: must be >= data.max_prompt_len + "
            f"rollout.max_new_tokens = {longest} (the longest sequence fits one micro-batch)"
        )
    if t.micro_batch_ranks < 1 or cfg.rollout_batch % (t.micro_batch_ranks * max(t.mini_batches, 1)):
        p.append(
            f"train.micro_batch_ranks={t.micro_batch_ranks}: must be >= 1 and ranks x train.mini_batches must "
            f"divide the rollout batch of {cfg.rollout_batch}"
        )
    return p


def _range_problems(cfg: TrainConfig) -> list[str]:
    """Values outside what their key accepts, named as `key=value: must be ...`."""
    r, e, c, w = cfg.rollout, cfg.eval, cfg.checkpoint, cfg.rewards
    p = sampling_problems(
        prefix="rollout.",
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        n=r.n,
    )
    p += sampling_problems(
        prefix="eval.", temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens, k=e.k
    )
    checks = (
        # training scores its rollouts at logits / rollout.temperature (objectives/logprobs.py); a
        # greedy rollout (0) has no sampling distribution to score. Negatives: named just above.
        (
            "rollout.temperature",
            r.temperature,
            r.temperature != 0,
            "> 0 (training scores logits / temperature; 0 = greedy is for eval.temperature only)",
        ),
        ("rollout.prompts_per_iteration", r.prompts_per_iteration, r.prompts_per_iteration >= 1, ">= 1"),
        ("rollout.slots", r.slots, r.slots >= 0, ">= 0 (0: auto, half the rollout rows)"),
        ("rollout.kv_pages", r.kv_pages, r.kv_pages >= 0, ">= 0 (0: a dense cache row per slot)"),
        ("rollout.page_size", r.page_size, r.page_size >= 1, ">= 1"),
        ("eval.every", e.every, e.every >= 0, ">= 0 (0: never)"),
        ("eval.batch_size", e.batch_size, e.batch_size >= 0, ">= 0 (0: one rollout batch of rows, / eval.k)"),
        ("checkpoint.every", c.every, c.every >= 0, ">= 0 (0: never)"),
        # keep 0 would let Orbax delete every checkpoint it writes: nothing to resume from.
        ("checkpoint.keep", c.keep, c.keep >= 1, ">= 1 (checkpoints kept to resume from)"),
        ("checkpoint.keep_best", c.keep_best, c.keep_best >= 0, ">= 0 (0: none by eval score)"),
        ("rewards.workers", w.workers, w.workers >= 0, ">= 0 (0: min(8, CPUs))"),
        ("rewards.timeout_s", w.timeout_s, w.timeout_s > 0, "> 0 (seconds per graded response)"),
    )
    return (
        p
        + [f"{key}={value!r}: must be {accepted}" for key, value, ok, accepted in checks if not ok]
        + _bucket_problems(cfg)
    )


def _bucket_problems(cfg: TrainConfig) -> list[str]:
    """Every prompt the data keeps (<= max_prompt_len tokens) must fit a prompt bucket: else the
    sampler raises mid-run, at the first long prompt or at the first evaluation."""
    from tgpo_jax.data import DataConfig

    buckets = cfg.rollout.prompt_buckets
    if not buckets or min(buckets) < 1:
        return [f"rollout.prompt_buckets={list(buckets)}: must be one or more lengths >= 1"]
    default = DataConfig.max_prompt_len
    lens = [("data.max_prompt_len", cfg.data.get("max_prompt_len", default))]
    if cfg.eval.data:
        lens.append(
            (
                "the eval set's max_prompt_len (eval.data, else data)",
                {**cfg.data, **cfg.eval.data}.get("max_prompt_len", default),
            )
        )
    return [
        f"{key}={n} exceeds the largest of rollout.prompt_buckets={list(buckets)}: add a bucket >= {n} or lower it"
        for key, n in lens
        if isinstance(n, int) and n > max(buckets)
    ]


def load_train_config(path_or_dict: str | dict, overrides: list[str] | None = None) -> TrainConfig:
    d = load_yaml(path_or_dict) if isinstance(path_or_dict, str) else dict(path_or_dict)
    d = apply_overrides(d, overrides or [])
    return validate(from_dict(TrainConfig, d))


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    from tgpo_jax.configtree import to_dict

    return to_dict(cfg)
