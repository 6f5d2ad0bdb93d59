"""Bad command-line and config inputs: exit code 2 and one line naming the flag or key, the value
and what is accepted, before any weights are read or anything compiles; help on every option."""

import argparse
import json
import os
import shutil

import pytest
import yaml

from tgpo_jax.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A complete tiny HF directory with a 64-position context (short enough to overflow cheaply)."""
    from tgpo_jax.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("m") / "tiny"), arch="qwen2", max_position_embeddings=64)


@pytest.fixture
def no_load(monkeypatch):
    """Reading weights, building a tokenizer-backed data set or compiling fails the test: every
    check below must answer before them."""

    def boom(*a, **k):
        raise AssertionError("reached weight loading / compilation")

    import tgpo_jax.models.hf_import as hf_import
    import tgpo_jax.rollout.text as text
    import tgpo_jax.train.setup as setup

    for mod, name in (
        (hf_import, "load_params"),
        (text, "load_model"),
        (setup, "build_data"),
        (setup, "build_model_parts"),
    ):
        monkeypatch.setattr(mod, name, boom)


def run(argv, capsys) -> str:
    """The command's exit code must be 2; returns its single stderr line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def corrupt_copy(tiny, tmp_path, how: str) -> str:
    out = str(tmp_path / f"bad_{how}")
    shutil.copytree(tiny, out)
    path = os.path.join(out, "config.json")
    if how == "json":
        with open(path, "w") as f:
            f.write('{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,')  # truncated
    else:
        with open(path) as f:
            hf = json.load(f)
        del hf["hidden_size"]
        with open(path, "w") as f:
            json.dump(hf, f)
    return out


# ---------------------------------------------------------------------------------------- sample
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens=0: must be >= 1"),
        (["--max-new-tokens", "-5"], "--max-new-tokens=-5: must be >= 1"),
        (["--temperature", "-1"], "--temperature=-1.0: must be >= 0 (0 = greedy)"),
        (["--top-p", "0"], "--top-p=0.0: must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k=-1: must be >= 0 (0 = off)"),
    ],
)
def test_sample_rejects_bad_flags(tiny, no_load, capsys, flags, expected):
    assert expected in run(["sample", "--model", tiny, "--prompt", "1+1", *flags], capsys)


def test_sample_rejects_an_empty_prompt(tiny, no_load, capsys):
    err = run(["sample", "--model", tiny, "--prompt", "ok", "--prompt", "", "--no-chat"], capsys)
    assert "--prompt #2 is empty" in err


def test_sample_rejects_a_prompt_beyond_the_context(tiny, no_load, capsys):
    from tgpo_jax.models.hf_import import load_tokenizer

    n = len(load_tokenizer(tiny)("1+1")["input_ids"])
    err = run(["sample", "--model", tiny, "--prompt", "1+1", "--no-chat", "--max-new-tokens", str(65 - n)], capsys)
    assert f"--prompt #1 ({n} tokens) + --max-new-tokens={65 - n} = 65 positions exceed" in err
    assert "context of 64" in err


@pytest.mark.parametrize(
    "how, expected",
    [("json", "config.json is not valid JSON"), ("field", "config.json lacks the required field 'hidden_size'")],
)
def test_corrupt_config_json_is_one_line_in_sample_and_eval(tiny, tmp_path, no_load, capsys, how, expected):
    bad = corrupt_copy(tiny, tmp_path, how)
    err = run(["sample", "--model", bad, "--prompt", "x"], capsys)
    assert err.startswith("tgpo-jax sample: error: --model: ") and bad in err and expected in err
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2", "data_source": "s"}) + "\n")
    err = run(["eval", "--model", bad, "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert err.startswith("tgpo-jax eval: error: --model: ") and expected in err


def test_sample_and_eval_name_a_missing_model_dir(tmp_path, capsys):
    assert "--model: model directory not found: /nonexistent/m" in run(
        ["sample", "--model", "/nonexistent/m", "--prompt", "x"], capsys
    )
    assert "--model: model directory not found: /nonexistent/m" in run(
        ["eval", "--model", "/nonexistent/m", "--data", "x.jsonl"], capsys
    )


# ------------------------------------------------------------------------------------------ eval
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens=0: must be >= 1"),
        (["--temperature", "-0.5"], "--temperature=-0.5: must be >= 0"),
        (["--top-p", "2"], "--top-p=2.0: must be in (0, 1]"),
        (["--k", "0"], "--k=0: must be >= 1"),
        (["--batch-size", "0"], "--batch-size=0: must be >= 1"),
        (["--num-workers", "-1"], "--num-workers=-1: must be >= 0"),
    ],
)
def test_eval_rejects_bad_flags_before_reading_anything(no_load, capsys, flags, expected):
    # The model directory does not exist: the flag check must come first.
    assert expected in run(["eval", "--model", "/nonexistent", "--data", "x.jsonl", *flags], capsys)


def test_eval_rejects_prompts_beyond_the_context(tiny, tmp_path, no_load, capsys):
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2", "data_source": "s"}) + "\n")
    err = run(
        [
            "eval",
            "--model",
            tiny,
            "--data",
            str(data),
            "--max-new-tokens",
            "64",
            "--template",
            "plain",
            "--system-prompt",
            "",
        ],
        capsys,
    )
    assert "the longest prompt (" in err and "+ --max-new-tokens=64 = " in err and "context of 64" in err


# ----------------------------------------------------------------------------------------- train
def train_yaml(tmp_path, tiny, **sections) -> str:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "models": {"student": tiny},
        "objective": {"name": "grpo"},
        "rollout": {"prompts_per_iteration": 2, "n": 2, "max_new_tokens": 8, "prompt_buckets": [32, 64]},
        "train": {"iterations": 1, "micro_batch": 2, "logprob_chunk": 8},
        "data": {"rg_tasks": ["chain_sum"], "rg_size": 8, "max_prompt_len": 32},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr=-1e-3", "optimizer.lr=-0.001: must be >= 0"),
        ("optimizer.warmup_steps=-2", "optimizer.warmup_steps=-2: must be >= 0"),
        ("checkpoint.keep=0", "checkpoint.keep=0: must be >= 1"),
        ("checkpoint.keep_best=-1", "checkpoint.keep_best=-1: must be >= 0"),
        ("rewards.workers=-1", "rewards.workers=-1: must be >= 0"),
        ("rewards.timeout_s=0", "rewards.timeout_s=0.0: must be > 0"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0: must be >= 1"),
        ("rollout.max_new_tokens=-5", "rollout.max_new_tokens=-5: must be >= 1"),
        ("rollout.temperature=-1", "rollout.temperature=-1.0: must be >= 0"),
        ("rollout.top_p=0", "rollout.top_p=0.0: must be in (0, 1]"),
        ("rollout.top_k=-3", "rollout.top_k=-3: must be >= 0"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens=0: must be >= 1"),
        ("eval.temperature=-0.1", "eval.temperature=-0.1: must be >= 0"),
        ("eval.k=0", "eval.k=0: must be >= 1"),
        ("models.dtype=int8", "models.dtype='int8': must be one of float32, bfloat16, float16"),
        ("data.max_prompt_len=100", "data.max_prompt_len=100 exceeds the largest of rollout.prompt_buckets=[32, 64]"),
    ],
)
def test_train_rejects_bad_values(tiny, tmp_path, no_load, capsys, override, expected):
    err = run(["train", "--config", train_yaml(tmp_path, tiny), override], capsys)
    assert expected in err
    assert "num_workers" not in err  # the user-facing key, never the internal field


@pytest.mark.parametrize(
    "override, expected",
    [
        ("models.student=/nonexistent/s", "models.student: model directory not found: /nonexistent/s"),
        ("models.tokenizer=/nonexistent/t", "models.tokenizer: tokenizer directory not found: /nonexistent/t"),
        (
            "data.max_prompt_len=60",
            "data.max_prompt_len=60 + rollout.max_new_tokens=8 = 68 positions exceed models.student's context of 64",
        ),
    ],
)
def test_train_names_the_model_key(tiny, tmp_path, no_load, capsys, override, expected):
    assert expected in run(["train", "--config", train_yaml(tmp_path, tiny), override], capsys)


def test_train_names_a_missing_teacher(tiny, tmp_path, no_load, capsys):
    cfg = train_yaml(tmp_path, tiny, objective={"name": "tgpo_reg"}, models={"teacher": "/nonexistent/t"})
    assert "models.teacher: model directory not found: /nonexistent/t" in run(["train", "--config", cfg], capsys)


@pytest.mark.parametrize("how", ["json", "field"])
def test_train_and_sft_corrupt_student_config_is_one_line(tiny, tmp_path, no_load, capsys, how):
    bad = corrupt_copy(tiny, tmp_path, how)
    err = run(["train", "--config", train_yaml(tmp_path, tiny), f"models.student={bad}"], capsys)
    assert err.startswith("tgpo-jax train: error: models.student: ") and os.path.join(bad, "config.json") in err
    err = run(["sft", "--config", sft_yaml(tmp_path, bad)], capsys)
    assert err.startswith("tgpo-jax sft: error: model: ") and os.path.join(bad, "config.json") in err


# ------------------------------------------------------------------------------------------- sft
def sft_yaml(tmp_path, model) -> str:
    path = tmp_path / "sft.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "sft"),
                "model": model,
                "data": {"rg_tasks": ["chain_sum"], "solution_column": "solution"},
            }
        )
    )
    return str(path)


def test_sft_rejects_a_negative_lr_and_names_a_missing_model(tmp_path, no_load, capsys, monkeypatch):
    import tgpo_jax.train.sft as sft_mod

    monkeypatch.setattr(sft_mod, "sft", lambda cfg: pytest.fail("sft() reached"))
    assert "optimizer.lr=-1.0: must be >= 0" in run(
        ["sft", "--config", sft_yaml(tmp_path, "/x"), "optimizer.lr=-1"], capsys
    )
    assert "model: model directory not found: /nonexistent/m" in run(
        ["sft", "--config", sft_yaml(tmp_path, "/nonexistent/m")], capsys
    )


# ------------------------------------------------------------------------------------------ help
def _walk(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + [name])
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_option_of_every_subcommand_has_help():
    actions = list(_walk(build_parser(), ["tgpo-jax"]))
    assert len(actions) > 100
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in actions if not (a.help or "").strip()]
    assert missing == []


def test_top_level_help_lists_every_bench_command_and_sample_has_top_p_top_k(capsys):
    parser = build_parser()
    bench = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(name in top for name in sub.choices) and "train-step" in top
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--top-p" in (out := capsys.readouterr().out) and "--top-k" in out


def test_info_names_a_corrupt_config_json(tiny, tmp_path, capsys):
    bad = corrupt_copy(tiny, tmp_path, "field")
    assert "config.json lacks the required field 'hidden_size'" in run(["info", "--model", bad], capsys)


def test_sample_top_k_and_top_p_reach_the_sampler(tiny, capsys):
    """Sampling at temperature 1 from the single most likely token (top-k 1, or a nucleus of mass
    1e-6) is greedy decoding: the same text as --temperature 0, unlike plain temperature 1."""

    def sample(*flags):
        assert main(["sample", "--model", tiny, "--prompt", "1+1", "--max-new-tokens", "6", *flags]) == 0
        return capsys.readouterr().out

    greedy = sample()
    assert sample("--temperature", "1", "--seed", "3") != greedy
    assert sample("--temperature", "1", "--top-k", "1", "--seed", "3") == greedy
    assert sample("--temperature", "1", "--top-p", "1e-6", "--seed", "3") == greedy
