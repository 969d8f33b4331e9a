"""launch/gpu_recipes.sh as a real process on the CPU: torchrun training, then `pipeline eval`
of best.pt; an unknown recipe is a clear error. (launch/multinode.sh runs in every two-node
test through conftest.two_agents; launch/slurm.sbatch in tests/test_slurm.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, metrics, sub_env


def gpu_recipes(*names: str, **env) -> subprocess.CompletedProcess:
    """launch/gpu_recipes.sh as a real process on the CPU, this interpreter as its Python;
    under `timeout -k` so that a hang takes torchrun's ranks down too."""
    return subprocess.run(
        ["timeout", "-k", "10", "280", "bash", "launch/gpu_recipes.sh", *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=sub_env(PY=sys.executable, NPROC=1, DEVICE="cpu", **env),
    )


@pytest.mark.slow
def test_gpu_recipes_script_trains_and_evaluates_best(tmp_path):
    """launch/gpu_recipes.sh end to end on the CPU at a tiny size: torchrun training, then
    `pipeline eval` of best.pt on validation and test; the validation loss it reports is the
    trainer's best validation loss (same streams, same checkpoint)."""
    tiny = (
        "train.amp=off model.hidden_size=32 model.embedding_size=32 "
        "model.num_layers=1 train.batch_size=8 train.num_steps=16 train.max_steps=24 "
        "train.eval_every=8 train.checkpoint_every=8 train.log_every=4 "
        "generate.prefixes=[] logging.wandb.mode=disabled"
    )
    out = tmp_path / "out"
    proc = gpu_recipes(
        "songci", RUNS=tmp_path / "runs", OUT=out, OVERRIDES_songci=tiny, HF_HOME=tmp_path / "hf"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL PASSED" in proc.stdout
    val = json.loads((out / "songci_validation.json").read_text().splitlines()[-1])
    test = json.loads((out / "songci_test.json").read_text().splitlines()[-1])
    assert val["split"] == "validation" and test["split"] == "test"
    assert val["checkpoint"].endswith("checkpoints/best.pt"), val
    best = min(e["val/loss"] for e in metrics(out / "songci_metrics.jsonl", "val/loss"))
    assert val["loss"] == pytest.approx(best, rel=1e-5)
    assert f"validation {val['bpc']:.3f}, test {test['bpc']:.3f}" in proc.stdout


def test_gpu_recipes_script_rejects_unknown_recipe(tmp_path):
    proc = gpu_recipes("nosuch", OUT=tmp_path / "out")
    assert proc.returncode == 1
    assert "no recipe configs/nosuch.yaml" in proc.stdout
