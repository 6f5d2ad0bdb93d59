"""Training config validation: every error is named before anything is built."""

import pytest

from tgpo_jax.configtree import ConfigError
from tgpo_jax.train.config import TrainConfig, load_train_config

BASE = {
    "models": {"student": "s", "teacher": "t"},
    "rollout": {"prompts_per_iteration": 4, "n": 4, "max_new_tokens": 32},
    "train": {"mini_batches": 2, "micro_batch": 4, "logprob_chunk": 16},
}


def _load(**patch):
    import copy

    d = copy.deepcopy(BASE)
    for k, v in patch.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return load_train_config(d)


def test_valid_config_and_defaults():
    cfg = _load()
    assert isinstance(cfg, TrainConfig) and cfg.rollout_batch == 16 and cfg.mini_batch == 8
    assert cfg.objective.name == "tgpo_reg" and cfg.optimizer.lr == 1e-6 and cfg.train.mini_batches == 2


def test_score_micro_batch_and_eval_batch_resolve_and_are_checked():
    cfg = _load()  # 4 prompts x n = 4, train.micro_batch 4, eval.k 1: the eval prefills no more prompts
    assert cfg.score_micro_batch_rows == 4 and cfg.eval_batch_prompts == 4
    cfg = _load(train={"score_micro_batch": 8}, eval={"batch_size": 3, "k": 4})
    assert cfg.score_micro_batch_rows == 8 and cfg.eval_batch_prompts == 3
    assert _load(eval={"k": 5}).eval_batch_prompts == 3 and _load(eval={"k": 32}).eval_batch_prompts == 1
    for bad in (-1, 3, 32):
        with pytest.raises(
            ConfigError,
            match=rf"train.score_micro_batch={bad}: must be 0 \(= train.micro_batch\) or a divisor >= 1 of the "
            r"rollout batch of 16",
        ):
            _load(train={"score_micro_batch": bad})
    with pytest.raises(ConfigError, match=r"eval.batch_size=-1: must be >= 0"):
        _load(eval={"batch_size": -1})


def test_unknown_key_lists_valid_keys():
    with pytest.raises(
        ConfigError, match=r"unknown key 'temprature' in rollout; valid keys: prompts_per_iteration, n, temperature"
    ):
        _load(rollout={"temprature": 0.5})
    with pytest.raises(ConfigError, match=r"unknown key 'optimiser' in config; valid keys: run_dir, models"):
        _load(optimiser={})


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match=r"rollout.n: expected int, got str 'eight'"):
        _load(rollout={"n": "eight"})
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float, got str"):
        _load(optimizer={"lr": "fast"})
    with pytest.raises(ConfigError, match=r"checkpoint.resume: expected bool"):
        _load(checkpoint={"resume": 3})


def test_inconsistent_values_are_named():
    with pytest.raises(ConfigError, match=r"train.micro_batch=3 does not divide the mini-batch of 8 sequences"):
        _load(train={"micro_batch": 3})
    with pytest.raises(ConfigError, match=r"train.mini_batches=3 does not divide the rollout batch of 16"):
        _load(train={"mini_batches": 3})
    with pytest.raises(ConfigError, match=r"rollout.n=1: objective 'grpo' uses GRPO group advantages"):
        _load(rollout={"n": 1, "prompts_per_iteration": 16}, objective={"name": "grpo"})
    with pytest.raises(ConfigError, match=r"objective 'tgpo_reg' needs a teacher: set models.teacher"):
        _load(models={"student": "s", "teacher": None})
    with pytest.raises(ConfigError, match=r"objective 'luffy' needs off-policy traces"):
        _load(objective={"name": "luffy"})
    with pytest.raises(ConfigError, match=r"unknown objective 'ppo'; accepted: tgpo_reg \| tgpo_adv"):
        _load(objective={"name": "ppo"})


def test_training_rejects_greedy_rollouts():
    """Training scores logits / rollout.temperature: 0 (greedy) is an error naming the key and what
    is accepted; eval.temperature may still be 0."""
    with pytest.raises(
        ConfigError, match=r"rollout.temperature=0.0: must be > 0 \(training scores logits / temperature"
    ):
        _load(rollout={"temperature": 0.0})
    with pytest.raises(ConfigError, match=r"rollout.temperature=-0.5: must be >= 0") as e:
        _load(rollout={"temperature": -0.5})
    assert "must be > 0" not in str(e.value)  # one message for a negative value
    assert _load(rollout={"temperature": 0.6}, eval={"temperature": 0.0}).rollout.temperature == 0.6


def test_token_budget_needs_the_authors_aggregation_and_fitting_sequences():
    """train.micro_batch_tokens > 0 only with objective.loss_agg microbatch_sum (the error names the
    accepted combinations), not with LUFFY's sum / T_max, and at least as large as the longest
    sequence (data.max_prompt_len + rollout.max_new_tokens = 128 + 32 here); ranks only with it."""
    mbsum = {"loss_agg": "microbatch_sum"}
    data = {"max_prompt_len": 128}
    accepted = r"accepted: train.micro_batch_tokens 0 with any loss_agg, or > 0 with objective.loss_agg microbatch_sum"
    with pytest.raises(
        ConfigError, match=rf"train.micro_batch_tokens=4096 with objective.loss_agg='token_mean'; {accepted}"
    ):
        _load(train={"micro_batch_tokens": 4096})
    with pytest.raises(ConfigError, match=r"with objective 'luffy', whose loss is sum / T_max per sequence"):
        _load(train={"micro_batch_tokens": 4096}, objective={"name": "luffy", **mbsum}, data={"solution_column": "s"})
    with pytest.raises(
        ConfigError,
        match=r"train.micro_batch_tokens=100: must be >= data.max_prompt_len \+ rollout.max_new_tokens = 160",
    ):
        _load(train={"micro_batch_tokens": 100}, objective=mbsum, data=data)
    with pytest.raises(ConfigError, match=r"train.micro_batch_tokens=-1: must be >= 0 \(0: off\)"):
        _load(train={"micro_batch_tokens": -1}, objective=mbsum)
    with pytest.raises(ConfigError, match=r"train.micro_batch_ranks=2: only applies with train.micro_batch_tokens > 0"):
        _load(train={"micro_batch_ranks": 2})
    with pytest.raises(ConfigError, match=r"train.micro_batch_ranks=3: must be >= 1 and ranks x train.mini_batches"):
        _load(train={"micro_batch_tokens": 160, "micro_batch_ranks": 3}, objective=mbsum, data=data)
    cfg = _load(train={"micro_batch_tokens": 160, "micro_batch_ranks": 4}, objective=mbsum, data=data)
    assert (cfg.train.micro_batch_tokens, cfg.train.micro_batch_ranks) == (160, 4)


def test_rkl_allows_group_size_one_and_overrides_apply():
    cfg = load_train_config(
        BASE, ["objective.name=rkl", "rollout.n=1", "rollout.prompts_per_iteration=16", "optimizer.lr=3e-4"]
    )
    assert cfg.objective.name == "rkl" and cfg.rollout.n == 1 and cfg.optimizer.lr == 3e-4
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_train_config(BASE, ["objective.name"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_train_config(str(bad))


def test_attention_kernel_options_are_validated_and_reach_both_models(tmp_path):
    with pytest.raises(ConfigError, match=r"models.attn_impl='flash'; accepted: einsum, sdpa, cudnn"):
        _load(models={"attn_impl": "flash"})
    with pytest.raises(ConfigError, match=r"models.attn_query_block=-2 must be >= 0 \(0: off\) or -1 \(auto\)"):
        _load(models={"attn_query_block": -2})
    with pytest.raises(ConfigError, match=r"models.cache_layers='stacked'; accepted: auto, unroll, scan"):
        _load(models={"cache_layers": "stacked"})
    with pytest.raises(ConfigError, match=r"models.remat_policy='all'; accepted: auto, nothing, attn_out"):
        _load(models={"remat_policy": "all"})

    from tests.train_e2e_helpers import tiny_models
    from tgpo_jax.train import setup

    student, teacher = tiny_models(str(tmp_path))
    defaults = _load(models={"student": student, "teacher": teacher}).models
    assert (defaults.attn_impl, defaults.attn_query_block) == ("auto", -1)
    cfg = _load(
        models={
            "student": student,
            "teacher": teacher,
            "attn_impl": "sdpa",
            "attn_query_block": 8,
            "cache_layers": "scan",
            "remat_policy": "nothing",
        }
    )
    _, s, t, _ = setup.build_models(cfg)
    for m in (s, t):
        assert (m.cfg.attn_impl, m.cfg.attn_query_block, m.cfg.cache_layers, m.cfg.remat_policy) == (
            "sdpa",
            8,
            "scan",
            "nothing",
        )


def test_sft_config_validates_its_attention_options_and_defaults_like_a_train_config():
    from tgpo_jax.train.sft import load_sft_config

    base = {"model": "m", "data": {"solution_column": "solution"}}
    cfg = load_sft_config(base)
    assert cfg.model_overrides() == {"attn_impl": "auto", "attn_query_block": -1}
    assert cfg.model_overrides() == {
        k: v for k, v in _load().models.model_overrides().items() if k in cfg.model_overrides()
    }
    with pytest.raises(ConfigError, match=r"attn_impl='flash'; accepted: einsum, sdpa, cudnn, cpu, splash, auto"):
        load_sft_config({**base, "attn_impl": "flash"})
    with pytest.raises(ConfigError, match=r"attn_query_block=-3 must be >= 0"):
        load_sft_config({**base, "attn_query_block": -3})


def test_distributed_settings_come_from_the_config_and_are_checked(monkeypatch):
    for var in (
        "TGPO_COORDINATOR_ADDRESS",
        "TGPO_NUM_PROCESSES",
        "TGPO_PROCESS_ID",
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    dist = {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}
    cfg = _load(sharding={"distributed": dist})
    assert (
        cfg.sharding.distributed.coordinator_address,
        cfg.sharding.distributed.num_processes,
        cfg.sharding.distributed.process_id,
    ) == ("10.0.0.2:8476", 4, 3)
    with pytest.raises(ConfigError, match=r"sharding.distributed: process_id must be in \[0, num_processes=4\); got 4"):
        _load(sharding={"distributed": dict(dist, process_id=4)})
    with pytest.raises(
        ConfigError, match=r"sharding.distributed: incomplete multi-process settings: missing num_processes"
    ):
        _load(sharding={"distributed": {"coordinator_address": "10.0.0.2:8476", "process_id": 0}})
    with pytest.raises(ConfigError, match=r"coordinator_addres"):  # unknown key: the valid ones are listed
        _load(sharding={"distributed": {"coordinator_addres": "x:1"}})


def test_every_section_is_typed_and_checked_at_load_by_its_full_key():
    """data, eval.data, the mesh and both rule tables are checked when the config is read, each error
    naming its full key; config.json (to_dict) keeps the YAML form."""
    from tgpo_jax.configtree import to_dict
    from tgpo_jax.data.config import DataSection
    from tgpo_jax.sharding import MeshConfig, ShardingRules

    bad = [
        ({"data": {"max_promt_len": 9}}, r"unknown key 'max_promt_len' in data; valid keys: files, "),
        ({"data": {"max_prompt_len": "long"}}, r"data.max_prompt_len: expected int, got str 'long'"),
        ({"eval": {"data": {"shufle": False}}}, r"unknown key 'shufle' in eval.data; valid keys: files"),
        ({"sharding": {"mesh": {"data": 0}}}, r"sharding.mesh: mesh axis 'data' has size 0"),
        ({"sharding": {"mesh": {"data": -1, "fsdp": -1}}}, r"sharding.mesh: at most one mesh axis may be -1"),
        ({"sharding": {"teacher_rules": {"embd": None}}}, r"unknown logical axis 'embd'.*sharding.teacher_rules"),
        ({"sharding": {"student_rules": {"embed": 3}}}, r"sharding.student_rules.embed must be null, a mesh axis"),
    ]
    for patch, match in bad:
        with pytest.raises(ConfigError, match=match):
            _load(**patch)
    given = {
        "data": {"files": "a.jsonl", "max_prompt_len": 64},
        "eval": {"data": {"files": ["b.jsonl"]}},
        "sharding": {"mesh": {"data": 2, "fsdp": -1}, "student_rules": {"embed": None, "batch": ["data"]}},
    }
    cfg = _load(**given, rollout={"prompt_buckets": [64]})
    assert isinstance(cfg.data, DataSection) and cfg.data.build().files == ("a.jsonl",)
    assert isinstance(cfg.sharding.mesh, MeshConfig) and cfg.sharding.mesh.resolve(4) == (2, 2)
    assert (
        isinstance(cfg.sharding.student_rules, ShardingRules) and cfg.sharding.student_rules.mesh_axes("embed") is None
    )
    d = to_dict(cfg)
    assert d["data"] == {"files": ["a.jsonl"], "max_prompt_len": 64} and d["eval"]["data"] == {"files": ["b.jsonl"]}
    assert d["sharding"]["mesh"] == {"data": 2, "fsdp": -1}
    assert d["sharding"]["student_rules"] == {"embed": None, "batch": ["data"]} and d["sharding"]["teacher_rules"] == {}
    assert load_train_config(d) == cfg  # config.json reads back as the same config


def test_rewards_section_sets_the_graders_workers():
    cfg = _load(rewards={"workers": 3, "timeout_s": 2.5, "think_format": False})
    r = cfg.rewards.reward_config()
    assert (r.num_workers, r.timeout_s, r.think_format) == (3, 2.5, False)


def test_sft_config_reuses_the_train_configs_sections():
    from tgpo_jax.sharding import MeshConfig, ShardingRules
    from tgpo_jax.train.sft import load_sft_config

    base = {"model": "m", "data": {"solution_column": "solution"}}
    cfg = load_sft_config({**base, "mesh": {"data": 2, "fsdp": -1}, "rules": {"embed": None}})
    assert isinstance(cfg.mesh, MeshConfig) and cfg.mesh.to_config() == {"data": 2, "fsdp": -1}
    assert isinstance(cfg.rules, ShardingRules) and cfg.rules.to_config() == {"embed": None}
    for patch, match in (
        ({"data": {"solution_column": "s", "colum": 1}}, r"unknown key 'colum' in data; valid keys: files"),
        ({"mesh": {"data": "two"}}, r"mesh: mesh axis 'data' has size 'two'"),
        ({"rules": {"hidden": None}}, r"unknown logical axis 'hidden' in sharding rules \(rules\)"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_sft_config({**base, **patch})


def test_an_old_config_json_reads_as_the_same_run():
    """config.json written before the sections were typed (plain dicts, a rule equal to its default)
    compares equal to today's config of the same YAML: a resume of an old run is not refused."""
    import json

    from tgpo_jax.train.config import config_dict
    from tgpo_jax.train.run_dir import config_changes

    old = json.loads(json.dumps(config_dict(_load())))
    old["sharding"] = {
        **old["sharding"],
        "student_rules": {"embed": "fsdp"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    }
    old["data"], old["eval"]["data"] = {"files": ["a.jsonl"], "max_prompt_len": 64}, {}
    new = config_dict(_load(data={"files": "a.jsonl", "max_prompt_len": 64}, rollout={"prompt_buckets": [64]}))
    old["rollout"]["prompt_buckets"] = [64]
    assert config_changes(old, new) == {}


def test_data_values_are_checked_at_load_by_key():
    with pytest.raises(ConfigError) as e:
        _load(data={"template": "chatml", "num_epochs": 0}, eval={"data": {"seed": -1}})
    for problem in (
        "data.template='chatml': must be one of chat, plain",
        "data.num_epochs=0: must be >= 1 or None (repeat forever)",
        "eval.data.seed=-1: must be in [0, 2**32)",
    ):
        assert problem in str(e.value)
    assert _load(data={}).data == {}  # no source yet: named when the run builds its data
