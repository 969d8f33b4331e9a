"""launch/gpu_check.sh's checks (bench/gpu_check.py) read the metrics pipeline/ writes today
and fail when what they check is broken: a real CPU run passes; copies of its metrics.jsonl
with a broken value, or with a metric renamed, fail naming what is wrong."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, sub_env

from bench import gpu_check
from pipeline.__main__ import main

ARGS = [*TINY, "train.device=cpu", "train.threads=1", "train.optimizer=adam", "train.lr=0.01"]
ARGS += ["model.hidden_size=64", "data.valid_fraction=0.1", "logging.progress=off"]
MIN_DROP = 0.05  # these 4 epochs of a small CPU run lower the loss by ~6% (the script: 20%)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("good") / "run"
    extra = ["train.epochs=4", "train.log_every=56"]  # validation once an epoch
    assert main(["train", *ARGS, *extra, f"run.dir={run_dir}"]) == 0
    return run_dir


def broken(good_run, tmp_path, change) -> object:
    """A copy of the run directory whose metrics.jsonl events went through `change`."""
    run_dir = tmp_path / "broken"
    shutil.copytree(good_run, run_dir)
    path = run_dir / "metrics.jsonl"
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    train = [e for e in events if "train/loss" in e]
    change(train, events)
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return run_dir


def test_a_real_run_passes(good_run):
    found, problems = gpu_check.check_training(good_run, "off", False, MIN_DROP)
    assert problems == [] and found["nonfinite_steps"] == 0 and found["flops_per_token"] > 0
    found, problems = gpu_check.check_songci(good_run, budget=600, max_bpc=20.0)
    assert problems == [] and found["val_bpc"] < found["val_bpc_curve"][0]


def _renamed(train, events):  # as when the metric was still amp/skipped_steps
    for e in train:
        e["amp/skipped_steps"] = e.pop("opt/nonfinite_steps")


def _nonfinite(train, events):
    train[1]["opt/nonfinite_steps"] = 4


def _nan(train, events):
    train[-1]["train/loss"] = math.nan


def _flat(train, events):
    train[-1]["train/loss"] = train[0]["train/loss"]


def _mfu(train, events):
    train[0]["perf/mfu"] = 1.7


def _precision(train, events):
    train[-1]["precision"] = "bf16"


@pytest.mark.parametrize(
    "change,needle",
    [
        (_renamed, "metric 'opt/nonfinite_steps' missing"),
        (_nonfinite, "4 non-finite (skipped) steps > 3"),
        (_nan, "non-finite training loss"),
        (_flat, "the loss did not fall"),
        (_mfu, "perf/mfu outside (0, 1)"),
        (_precision, "precision ['bf16', 'off'], asked for off"),
    ],
)
def test_a_broken_value_fails_its_check(good_run, tmp_path, change, needle):
    _, problems = gpu_check.check_training(
        broken(good_run, tmp_path, change), "off", False, MIN_DROP
    )
    assert any(needle in p for p in problems), problems


def test_mfu_missing_where_the_peak_is_known_fails(good_run):
    _, problems = gpu_check.check_training(good_run, "off", True, MIN_DROP)  # a CPU run: none
    assert problems == ["perf/mfu missing on a card whose peak is known"]


def test_songci_checks_fail_when_broken(good_run, tmp_path):
    def worse(train, events):
        val = [e for e in events if "val/bpc" in e]
        val[-1]["val/bpc"] = val[0]["val/bpc"] + 1

    _, problems = gpu_check.check_songci(broken(good_run, tmp_path, worse), 600, 20.0)
    assert any("did not fall" in p for p in problems), problems
    _, problems = gpu_check.check_songci(good_run, 600, max_bpc=1.0)
    assert any("not below 1.0" in p for p in problems), problems
    _, problems = gpu_check.check_songci(good_run, budget=0.01, max_bpc=20.0)
    assert any("budget" in p for p in problems), problems


def test_the_command_exits_1_and_records_the_failure(good_run, tmp_path, capsys):
    results = tmp_path / "results.json"
    bad = broken(good_run, tmp_path, _renamed)
    good = ["run", str(good_run), "--min-drop", str(MIN_DROP), "--results", str(results)]
    assert gpu_check.main(good) == 0
    code = gpu_check.main(
        ["run", str(bad), "--min-drop", "0.05", "--results", str(results), "--key", "bad"]
    )
    assert code == 1 and "FAIL (bad): metric 'opt/nonfinite_steps'" in capsys.readouterr().out
    data = json.loads(results.read_text())
    assert data["run_off"]["passed"] and not data["bad"]["passed"]


@pytest.mark.slow
def test_a_test_needing_a_missing_package_skips_naming_it(tmp_path):
    """On a machine with only torch and the project's packages (gpu_check.sh), a test that
    imports something else skips, naming it (tests/conftest.py's hooks)."""
    (tmp_path / "test_needs.py").write_text(
        "import not_installed_pkg_a\n\ndef test_a():\n    pass\n", encoding="utf-8"
    )
    (tmp_path / "test_inside.py").write_text(
        "def test_b():\n    import not_installed_pkg_b.sub\n\ndef test_c():\n    pass\n",
        encoding="utf-8",
    )
    env = sub_env(PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "needs the package 'not_installed_pkg_a'" in proc.stdout
    assert "needs the package 'not_installed_pkg_b'" in proc.stdout
    assert "1 passed, 2 skipped" in proc.stdout
