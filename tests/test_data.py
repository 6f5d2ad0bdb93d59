"""Data: file formats, bad input, prompt rendering, the grain pipeline's determinism, sharding and
exact resume (also through Orbax), and reasoning-gym tasks."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tgpo_jax.data import (
    THINK_PREFIX,
    DataConfig,
    EmptyDatasetError,
    PromptRenderer,
    bucket_by_length,
    bucket_for,
    build_prompt_set,
    left_pad,
    load_records,
    make_data_iterator,
)
from tgpo_jax.models.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _rows(n=23):
    return [
        {
            "problem": f"What is {i} + {i}?",
            "answer": str(2 * i),
            "data_source": "easy" if i % 2 else "hard",
            "solution": f"{i} + {i} = {2 * i}",
            "extra": i,
        }
        for i in range(n)
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


@pytest.fixture()
def jsonl(tmp_path):
    return _write_jsonl(tmp_path / "train.jsonl", _rows())


def _cfg(path, **kw):
    return DataConfig(files=(path,), **{"batch_size": 4, "seed": 1, **kw})


# ------------------------------------------------------------------------------------------ config
def test_config_from_dict_rejects_unknown_keys_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key 'batchsize' in data; valid keys: files, "):
        DataConfig.from_dict({"files": ["a.jsonl"], "batchsize": 3})
    cfg = DataConfig.from_dict({"files": "a.jsonl", "solution_column": "sol"})
    assert cfg.files == ("a.jsonl",) and cfg.solution_column == "sol"
    with pytest.raises(ValueError, match="exactly one source"):
        DataConfig()
    with pytest.raises(ValueError, match="template='jinja'"):
        DataConfig(files=("a",), template="jinja")


# ------------------------------------------------------------------------------------------ files
def test_parquet_and_jsonl_load_identically(tmp_path, tok):
    rows = _rows()
    rows[3]["answer"] = ""  # skipped
    del rows[5]["answer"]  # skipped
    a = _cfg(_write_jsonl(tmp_path / "set.jsonl", rows), solution_column="solution")
    b = _cfg(_write_parquet(tmp_path / "set.parquet", rows), solution_column="solution")
    ra, sa = load_records(a)
    rb, sb = load_records(b)
    assert ra == rb and sa == sb and sa.skipped_no_answer == 2 and len(ra) == 21
    assert ra[0] == {
        "problem": "What is 0 + 0?",
        "answer": "0",
        "data_source": "hard",
        "solution": "0 + 0 = 0",
        "index": 0,
    }
    pa_, pb = build_prompt_set(a, tok), build_prompt_set(b, tok)
    assert pa_.records == pb.records and pa_.stats.per_source == {"easy": 9, "hard": 12}


def test_nested_columns_and_chat_message_problems(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "Compute 2+2."}],
            "reward_model": {"ground_truth": 4},
        }
    ]
    path = _write_parquet(tmp_path / "verl.parquet", rows)
    recs, _ = load_records(_cfg(path, problem_column="prompt", answer_column="reward_model.ground_truth"))
    assert recs[0]["problem"] == "Compute 2+2." and recs[0]["answer"] == "4" and recs[0]["data_source"] == "verl"


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_missing_column_names_it_and_lists_the_columns_found(tmp_path, ext):
    rows = [{"question": "1+1?", "answer": "2"}]
    path = (_write_jsonl if ext == "jsonl" else _write_parquet)(tmp_path / f"d.{ext}", rows)
    with pytest.raises(ValueError, match=r"column 'problem' \(problem\) not found; columns found: question, answer"):
        load_records(_cfg(path))
    with pytest.raises(ValueError, match=r"'sol' \(off-policy solution\) not found"):
        load_records(_cfg(path, problem_column="question", solution_column="sol"))


def test_empty_dataset_after_filtering_is_a_clear_error(tmp_path, tok):
    path = _write_jsonl(tmp_path / "e.jsonl", [{"problem": "p", "answer": " "}, {"problem": "q", "answer": None}])
    with pytest.raises(EmptyDatasetError, match="no prompt left after filtering.*2 without an answer skipped"):
        build_prompt_set(_cfg(path), tok)
    with pytest.raises(EmptyDatasetError, match="2 prompts over max_prompt_len dropped"):
        build_prompt_set(_cfg(_write_jsonl(tmp_path / "l.jsonl", _rows(2)), max_prompt_len=5), tok)
    with pytest.raises(ValueError, match="unsupported data file type .csv"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_records(_cfg(str(tmp_path / "x.csv")))


def test_long_prompts_are_dropped_and_counted_never_truncated(tmp_path, tok):
    rows = _rows(6)
    rows[2]["problem"] = "word " * 300
    ps = build_prompt_set(_cfg(_write_jsonl(tmp_path / "d.jsonl", rows), max_prompt_len=200), tok)
    assert ps.stats.dropped_too_long == 1 and ps.stats.kept == 5
    assert all(len(r["prompt_ids"]) <= 200 for r in ps.records)
    assert [r["index"] for r in ps.records] == list(range(5))


# ------------------------------------------------------------------------------------------ rendering
def test_chat_rendering_has_system_prompt_and_think_suffix(tok):
    r = PromptRenderer(tok, system_prompt="Think in <think> tags.", think_suffix=True)
    text = r.render("What is 1+1?")
    assert text.startswith("<|im_start|>system\nThink in <think> tags.<|im_end|>\n<|im_start|>user\nWhat is 1+1?")
    assert text.endswith("<|im_start|>assistant\n" + THINK_PREFIX)
    ids = r.encode(["What is 1+1?"])[0]
    assert tok.decode(ids) == text and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert not PromptRenderer(tok, think_suffix=False).render("x").endswith(THINK_PREFIX)

    class ThinkingTemplate:  # a template that opens the thought itself (Qwen3 / R1 style): no second one
        chat_template = "stub"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]" + THINK_PREFIX

    assert PromptRenderer(ThinkingTemplate(), system_prompt="S").render("q") == "[system]S[user]q[assistant]<think>\n"


def test_plain_template_for_base_models(tok):
    r = PromptRenderer(tok, system_prompt="Be brief.", template="plain")
    assert r.render("2+2?") == "Be brief.\n\nUser: 2+2?\nAssistant: <think>\n"
    assert PromptRenderer(tok, template="plain").render("2+2?") == "User: 2+2?\nAssistant: <think>\n"
    no_template = build_tiny_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template: set `template: plain`"):
        PromptRenderer(no_template)


def test_left_pad_and_buckets():
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=0, length=4)
    assert tokens.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    with pytest.raises(ValueError, match="does not fit"):
        left_pad([[1, 2, 3]], 0, length=2)
    assert bucket_for(17, (16, 32, 64)) == 32
    assert bucket_by_length([[1] * 20, [1] * 3, [1] * 40, [1] * 16], (16, 32, 64)) == {16: [1, 3], 32: [0], 64: [2]}


# ------------------------------------------------------------------------------------------ pipeline
def _take(it, n):
    return [next(it).indices.tolist() for _ in range(n)]


def test_pipeline_is_deterministic_and_reshuffles_each_epoch(jsonl, tok):
    ps = build_prompt_set(_cfg(jsonl), tok)
    first = _take(make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=0, process_count=1), 12)
    again = _take(make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=0, process_count=1), 12)
    other = _take(make_data_iterator(_cfg(jsonl, seed=2), prompt_set=ps, process_index=0, process_count=1), 12)
    assert first == again and first != other
    stream = sum(first, [])
    epoch1, epoch2 = stream[:23], stream[23:46]
    assert sorted(epoch1) == list(range(23)) and sorted(epoch2) == list(range(23)) and epoch1 != epoch2
    unshuffled = _take(
        make_data_iterator(_cfg(jsonl, shuffle=False), prompt_set=ps, process_index=0, process_count=1), 2
    )
    assert unshuffled == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_pipeline_resumes_exactly_from_a_mid_epoch_state(jsonl, tok):
    ps = build_prompt_set(_cfg(jsonl), tok)
    it = make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=0, process_count=1)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    expected = _take(it, 7)  # crosses the epoch boundary
    resumed = make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=0, process_count=1)
    resumed.set_state(state)
    assert _take(resumed, 7) == expected
    batch = next(resumed)
    assert len(batch) == 4 and batch.answers[0] == str(2 * int(batch.indices[0]))  # no row was skipped
    other = make_data_iterator(_cfg(jsonl, batch_size=2), prompt_set=ps, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


def test_per_process_shards_make_up_the_global_batch(jsonl, tok):
    ps = build_prompt_set(_cfg(jsonl), tok)
    whole = make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=0, process_count=1)
    shards = [make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=p, process_count=2) for p in range(2)]
    for _ in range(8):
        parts = [next(s).indices.tolist() for s in shards]
        assert all(len(p) == 2 for p in parts)
        assert sorted(parts[0] + parts[1]) == sorted(next(whole).indices.tolist())
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=0, process_count=3)


def test_iterator_state_round_trips_through_orbax(jsonl, tok, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    ps = build_prompt_set(_cfg(jsonl), tok)
    it = make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=0, process_count=1)
    _take(it, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = _take(it, 3)
        fresh = make_data_iterator(_cfg(jsonl), prompt_set=ps, process_index=0, process_count=1)
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _take(fresh, 3) == expected


def test_finite_epochs_end(jsonl, tok):
    ps = build_prompt_set(_cfg(jsonl), tok)
    it = make_data_iterator(_cfg(jsonl, num_epochs=2), prompt_set=ps, process_index=0, process_count=1)
    assert len(list(it)) == (2 * 23) // 4 and it.steps_per_epoch == 23 // 4


# ------------------------------------------------------------------------------------------ reasoning-gym
def test_reasoning_gym_prompts_are_deterministic_and_rendered(tok):
    cfg = DataConfig(rg_tasks=("chain_sum",), rg_size=6, rg_seed=5, rg_difficulty=2, batch_size=2)
    a, b = build_prompt_set(cfg, tok), build_prompt_set(cfg, tok)
    assert [r["problem"] for r in a.records] == [r["problem"] for r in b.records] and len(a.records) == 6
    other_seed = build_prompt_set(DataConfig(rg_tasks=("chain_sum",), rg_size=6, rg_seed=6, rg_difficulty=2), tok)
    assert [r["problem"] for r in other_seed.records] != [r["problem"] for r in a.records]
    rec = a.records[0]
    assert rec["data_source"] == "chain_sum" and rec["answer"]["reasoning_gym"] == "chain_sum"
    assert rec["answer"]["config"]["max_terms"] == 4  # curriculum level 2: terms in [2, 4]
    assert tok.decode(rec["prompt_ids"]).endswith(rec["problem"] + "<|im_end|>\n<|im_start|>assistant\n<think>\n")
    batch = next(make_data_iterator(cfg, prompt_set=a, process_index=0, process_count=1))
    assert len(batch) == 2
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'nope'; available: "):
        build_prompt_set(DataConfig(rg_tasks=("nope",)), tok)


def test_train_stops_on_an_empty_dataset_before_any_model_is_loaded(tmp_path, tok, capsys):
    """The student directory holds a tokenizer and a config.json (read first: its context bounds the
    prompts) but no weights: the data error must come before any weight is loaded."""
    from tgpo_jax.cli import main
    from tgpo_jax.models.tiny import make_tiny_checkpoint

    student = make_tiny_checkpoint(
        str(tmp_path / "student"),
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        max_position_embeddings=16384,
    )
    for f in os.listdir(student):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(student, f))
    tok.save_pretrained(student)
    data = _write_jsonl(tmp_path / "e.jsonl", [{"problem": "p", "answer": ""}, {"problem": "", "answer": "1"}])
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "models": {"student": str(tmp_path / "student")},
        "objective": {"name": "grpo"},
        "data": {"files": [data]},
        "rewards": {"workers": 1},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert (
        "tgpo-jax train: error: no prompt left after filtering (2 rows read, 1 without a problem and 1 "
        "without an answer skipped" in err
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
