"""`python -m pipeline compare`: a table of two real runs and a PNG plot."""

from __future__ import annotations

import struct

import pytest
from conftest import TINY, run_cli

SMALL = [
    *TINY,
    "data.valid_fraction=0.1",
    "train.max_steps=12",
    "train.log_every=4",
    "train.eval_every=6",
]


@pytest.fixture(scope="module")
def two_runs(trained):
    return [trained([*SMALL, f"train.sampling={s}"], "one") for s in ("consecutive", "random")]


@pytest.mark.slow
def test_compare_prints_table_and_writes_png(two_runs, tmp_path):
    dirs, png = two_runs, tmp_path / "compare.png"
    out = run_cli(["compare", *map(str, dirs), "--plot", str(png)], timeout=120).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["train.sampling"] == ["consecutive", "random"]  # the differing key
    assert "run.dir" not in rows and "model.kind" not in rows  # only differences
    for label in (
        "best val perplexity",
        "final val perplexity",
        "tokens/s (median)",
        "wall time (s)",
        "world size",
    ):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(label))
        values = line.strip()[len(label) :].split()
        assert len(values) == 2 and "-" not in values, line
    world = next(ln for ln in out.splitlines() if ln.strip().startswith("world size"))
    assert world.split()[-2:] == ["1", "1"]

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert 800 <= width <= 3000 and 300 <= height <= 2000
    assert 10_000 < len(data) < 5_000_000


@pytest.mark.slow
def test_compare_rejects_a_directory_without_metrics(two_runs, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(
        ["compare", str(two_runs[0]), str(tmp_path / "empty"), "--plot", str(tmp_path / "x.png")],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "has no metrics.jsonl" in proc.stderr and str(tmp_path / "empty") in proc.stderr
    assert not (tmp_path / "x.png").exists()
