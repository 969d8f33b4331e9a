"""pipeline.run.checkpoint on its own: atomic writes, weights-only loading, damaged and hostile
files, fallback to the newest good checkpoint, pruning, the compatibility check."""

from __future__ import annotations

import io
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from pipeline.run import checkpoint as ckpt
from pipeline.run.checkpoint import CheckpointError


def state(step: int) -> dict:
    """A checkpoint-shaped dict: tensors and plain values only."""
    return {
        "format": ckpt.FORMAT,
        "model": {"w": torch.full((64,), float(step))},
        "vocab": ["a", "b"],
        "step": step,
        "hidden": [torch.zeros(1, 4, 8)],
        "config": {"train": {"batch_size": 4}},
        "best_val_loss": float("inf"),
    }


def test_roundtrip_is_weights_only(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_atomic(state(3), path)
    loaded = torch.load(path, weights_only=True)  # the stable interface, without our wrapper
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.full((64,), 3.0))
    assert ckpt.load(path)["vocab"] == ["a", "b"]
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


class WritesMarker:
    """Unpickling this calls exec(): what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _hostile(path: Path, marker: Path) -> None:
    torch.save({**state(1), "extra": WritesMarker(marker)}, path)


def _truncated(path: Path, marker: Path) -> None:
    buf = io.BytesIO()
    torch.save(state(1), buf)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _random_bytes(path: Path, marker: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())


def _plain_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model": {}, "vocab": []}))  # not a torch file at all


def _foreign(path: Path, marker: Path) -> None:
    torch.save({"weights": torch.ones(3)}, path)  # loads, but is not our checkpoint


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "make,why",
    [
        (_hostile, "holds a pickled object (exec) that could run code"),
        (_truncated, "truncated or corrupt"),
        (_random_bytes, "truncated or corrupt"),
        (_plain_pickle, "truncated or corrupt"),
        (_foreign, "is not a checkpoint of this pipeline"),
    ],
)
def test_bad_files_are_clear_errors_and_run_no_code(tmp_path, make, why):
    path, marker = tmp_path / "bad.pt", tmp_path / "marker"
    make(path, marker)
    with pytest.raises(CheckpointError) as err:
        ckpt.load(path)
    assert f"checkpoint '{path}'" in str(err.value) and why in str(err.value)
    assert not marker.exists()


def test_hostile_file_really_runs_code_when_loaded_unsafely(tmp_path):
    """The guard of the test above: the same file does run code without weights_only."""
    path, marker = tmp_path / "bad.pt", tmp_path / "marker"
    _hostile(path, marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt' does not exist"):
        ckpt.load(tmp_path / "nope.pt")


def _run_dir_with(tmp_path: Path, steps: list[int], last: int | None) -> Path:
    cdir = ckpt.checkpoint_dir(tmp_path)
    for s in steps:
        ckpt.save_atomic(state(s), cdir / f"step_{s:08d}.pt")
    if last is not None:
        ckpt.link_atomic(cdir / f"step_{last:08d}.pt", cdir / "last.pt")
    return tmp_path


def test_latest_good_prefers_last_then_falls_back_newest_first(tmp_path):
    run = _run_dir_with(tmp_path, [5, 10, 15], last=15)
    assert ckpt.load_latest_good(run)[1]["step"] == 15
    cdir = ckpt.checkpoint_dir(run)
    (cdir / "last.pt").unlink()
    (cdir / "last.pt").write_bytes(b"\x00garbage")  # damaged last.pt (no longer a link)
    _truncated(cdir / "step_00000015.pt", tmp_path / "unused")
    said = []
    path, saved = ckpt.load_latest_good(run, warn=said.append)
    assert path.name == "step_00000010.pt" and saved["step"] == 10
    assert len(said) == 2 and all("falling back to" in s and "step_00000010.pt" in s for s in said)
    assert "last.pt" in said[0] and "step_00000015.pt" in said[1]


def test_latest_good_none_or_all_bad(tmp_path):
    assert ckpt.load_latest_good(tmp_path) is None
    cdir = ckpt.checkpoint_dir(tmp_path)
    cdir.mkdir(parents=True)
    (cdir / "last.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ckpt.load_latest_good(tmp_path)


def test_prune_keeps_newest_and_removes_partial_writes(tmp_path):
    run = _run_dir_with(tmp_path, [5, 10, 15, 20], last=20)
    cdir = ckpt.checkpoint_dir(run)
    (cdir / "step_00000025.pt.x1y2.tmp").write_bytes(b"half a file")
    ckpt.prune(run, keep=2)
    assert sorted(p.name for p in cdir.iterdir()) == [
        "last.pt",
        "step_00000015.pt",
        "step_00000020.pt",
    ]
    assert ckpt.load(cdir / "last.pt")["step"] == 20  # a hard link survives its pruned twin


# A writer killed in the middle of torch.save: the child writes half of the new file, says
# so, and waits to be killed (blocked on its stdin, which the test never writes to; should
# the test die first, the closed pipe ends the child without finishing the file).
KILLED_WRITER = textwrap.dedent("""
    import io, os, sys, torch
    from pipeline.run import checkpoint as ckpt
    real_save = torch.save
    def half_save(obj, f):
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush()
        print("writing", flush=True); sys.stdin.read(); os._exit(1)
    torch.save = half_save
    ckpt.save_atomic({"model": {"w": torch.full((64,), 2.0)}, "vocab": ["a", "b"], "step": 2},
                     ckpt.Path(sys.argv[1]))
""")


def test_killed_while_writing_leaves_previous_last_loadable(tmp_path):
    last = ckpt.checkpoint_dir(tmp_path) / "last.pt"
    ckpt.save_atomic(state(1), last)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(last)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        partial = list(last.parent.glob("*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # killed mid-write
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert ckpt.load(last)["step"] == 1
    assert ckpt.load_latest_good(tmp_path)[1]["step"] == 1
    assert ckpt.candidates(tmp_path) == [last]


CFG = {
    "model": {
        "kind": "lstm",
        "hidden_size": 32,
        "num_layers": 2,
        "embedding_size": 0,
        "tie_weights": False,
        "dropout": 0.0,
    },
    "train": {"batch_size": 4, "num_steps": 8, "sampling": "random", "max_steps": 10},
}


@pytest.mark.parametrize(
    "key,value",
    [
        ("model.kind", "gru"),
        ("model.hidden_size", 16),
        ("model.num_layers", 1),
        ("train.batch_size", 8),
        ("train.num_steps", 4),
        ("train.sampling", "consecutive"),
    ],
)
def test_incompatible_config_names_the_key(key, value):
    section, name = key.split(".")
    now = {**CFG, section: {**CFG[section], name: value}}
    with pytest.raises(CheckpointError, match=rf"x\.pt' has {key}=.* this run has {key}="):
        ckpt.check_compatible({"config": CFG, "vocab": ["a"]}, now, ["a"], Path("x.pt"))


def test_compatible_despite_other_length_dropout_or_lr():
    now = {
        **CFG,
        "train": {**CFG["train"], "max_steps": 99},
        "model": {**CFG["model"], "dropout": 0.5},
    }
    ckpt.check_compatible({"config": CFG, "vocab": ["a", "b"]}, now, ["a", "b"], Path("x.pt"))


def test_other_vocabulary_is_an_error():
    with pytest.raises(CheckpointError, match="x.pt' has a different vocabulary"):
        ckpt.check_compatible({"config": CFG, "vocab": ["a", "b"]}, CFG, ["a", "c"], Path("x.pt"))
