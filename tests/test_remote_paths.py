"""gs:// run directories: metrics, TensorBoard events and plots go through etils.epath (here onto an
in-memory fake of GCS registered with fsspec), checkpoints reach Orbax unmangled, and nothing is
created on the local disk."""

from __future__ import annotations

import importlib
import json
import os

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from tgpo_jax import paths


class FakeGCS(MemoryFileSystem):
    """An in-memory object store answering to gs:// (and gcs://, the name etils asks fsspec for)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        for prefix in ("gs://", "gcs://"):
            if isinstance(path, str) and path.startswith(prefix):
                path = path[len(prefix) :]
        return MemoryFileSystem._strip_protocol(path)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    from etils.epath import backend

    registry = importlib.import_module("fsspec.registry")._registry
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, FakeGCS)  # restored after the test
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    FakeGCS.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    yield FakeGCS.store
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    assert os.listdir(tmp_path) == [], f"local files were created for a gs:// run: {os.listdir(tmp_path)}"


def test_path_helpers():
    assert paths.is_remote("gs://b/run") and not paths.is_remote("runs/x") and not paths.is_remote("file:///tmp/x")
    assert paths.join("gs://b/run", "checkpoints", "latest") == "gs://b/run/checkpoints/latest"
    assert paths.abspath("gs://b/run") == "gs://b/run"
    assert paths.abspath("runs/x") == os.path.abspath("runs/x")
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'.*gs://"):
        paths.is_remote("ftp://host/x")


def test_metrics_tensorboard_and_plot_on_gcs(fake_gcs):
    from tgpo_jax.train.metrics import MetricsWriter, plot_curves, read_jsonl

    run = "gs://bucket/exp/run1"
    w = MetricsWriter(run, progress=False)
    w.write(1, 2, {"reward/mean": 0.25, "loss/total": 1.5})
    w.write(2, 4, {"reward/mean": 0.5, "loss/total": 1.25})
    w.close()
    w = MetricsWriter(run, progress=False, tensorboard=False, initial_iteration=2)  # a resumed run appends
    w.write(3, 6, {"reward/mean": 0.75, "loss/total": 1.0})
    w.close()
    rows = read_jsonl(paths.join(run, "metrics.jsonl"))
    assert [(r["iteration"], r["optimizer_step"], r["reward/mean"]) for r in rows] == [
        (1, 2, 0.25),
        (2, 4, 0.5),
        (3, 6, 0.75),
    ]

    events = [k for k in fake_gcs if k.startswith("/bucket/exp/run1/tensorboard/events.out.tfevents")]
    assert len(events) == 1, sorted(fake_gcs)
    data = fake_gcs[events[0]].getvalue()
    assert b"reward/mean" in data and b"loss/total" in data

    out = plot_curves(paths.join(run, "metrics.jsonl"), paths.join(run, "curves.png"))
    assert out == "gs://bucket/exp/run1/curves.png"
    assert fake_gcs["/bucket/exp/run1/curves.png"].getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_parse(fake_gcs, tmp_path_factory):
    """The bytes written to the object store are a valid TensorBoard record stream."""
    from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401  (tensorboardX present)
    from tensorboardX.proto import event_pb2

    from tgpo_jax.train.metrics import MetricsWriter

    w = MetricsWriter("gs://bucket/tb", progress=False, jsonl=False)
    w.write(7, 14, {"reward/mean": 0.5})
    w.close()
    (key,) = [k for k in fake_gcs if "/tensorboard/events" in k]
    data, pos, found = fake_gcs[key].getvalue(), 0, {}
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 8], "little")
        ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
        for v in ev.summary.value:
            found[v.tag] = (ev.step, v.simple_value)
    assert found == {"reward/mean": (7, 0.5)}


def test_checkpoint_dirs_reach_orbax_unmangled(monkeypatch, tmp_path):
    import orbax.checkpoint as ocp

    from tgpo_jax.train import checkpoint

    seen = []

    class Recorder:
        def __init__(self, directory, options=None):
            seen.append(str(directory))

    monkeypatch.setattr(ocp, "CheckpointManager", Recorder)
    checkpoint.RunCheckpoints("gs://bucket/exp/run1", keep=2, keep_best=1)
    assert seen == ["gs://bucket/exp/run1/checkpoints/latest", "gs://bucket/exp/run1/checkpoints/best"]
    seen.clear()
    monkeypatch.chdir(tmp_path)
    checkpoint.RunCheckpoints("runs/local", keep=2, keep_best=0)
    assert seen == [os.path.join(str(tmp_path), "runs", "local", "checkpoints", "latest")]


def test_metrics_local_unchanged(tmp_path):
    from tgpo_jax.train.metrics import MetricsWriter

    w = MetricsWriter(str(tmp_path / "run"), progress=False, tensorboard=False)
    w.write(1, 1, {"reward/mean": 1})
    w.close()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert json.loads(f.readline())["reward/mean"] == 1.0
