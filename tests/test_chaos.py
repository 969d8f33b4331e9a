"""A smaller storm than `python -m bench.chaos` (20 faults): 3 faults in one 2-rank torchrun
job, one to an attempt, drawn to cover a kill, a preemption, a write fault and both ranks;
the job must end bit-identical to the undisturbed run (bench/chaos.py says what is compared).
Then the comparison itself must see a difference where one was made."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bench import chaos

pytestmark = pytest.mark.slow
N = 3


def covering_seed() -> int:
    """The first seed whose schedule of N faults has every family and both ranks."""
    families = (("sigkill", "torn", "resume_kill"), chaos.PREEMPT, ("enospc", "eio", "torn"))
    for seed in range(1000):
        faults = chaos.schedule(N, seed, chaos.steps_for(N))
        kinds = {f.kind for f in faults}
        if all(kinds & set(fam) for fam in families) and {f.rank for f in faults} == {0, 1}:
            return seed
    raise AssertionError("no seed covers every family")


def test_a_storm_of_faults_ends_bit_identical(tmp_path, capsys):
    seed = covering_seed()
    assert chaos.main(["--faults", str(N), "--seed", str(seed), "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"chaos seed {seed}: PASS" in out and "DIFFERENCE" not in out
    for f in chaos.schedule(N, seed, chaos.steps_for(N)):  # the schedule is printed
        assert f"{f.attempt:>7}  {f.kind:<11}  {f.rank:>4}" in out
    exits = [json.loads(line) for line in (tmp_path / "storm.exits").read_text().splitlines()]
    assert {e["attempt"] for e in exits} == set(range(N + 1))  # one attempt a fault, then one

    # the comparison sees what it should: a lost event, a changed parameter, a leftover
    straight, wandb = tmp_path / "straight", tmp_path / "storm.wandb"
    assert chaos.differences(tmp_path / "storm", straight, wandb) == []
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "storm", bad)
    lines = (bad / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if '"step": 7,' in line and "train/loss" in line)
    (bad / "metrics.jsonl").write_text("".join(lines[:at] + lines[at + 1 :]), encoding="utf-8")
    last = torch.load(bad / "checkpoints" / "last.pt", weights_only=True)
    name = next(iter(last["model"]))
    last["model"][name] = last["model"][name].clone()
    last["model"][name].view(-1)[0] += 1e-6
    (bad / "checkpoints" / "last.pt").unlink()
    torch.save(last, bad / "checkpoints" / "last.pt")
    (bad / "checkpoints" / "step_00000099.pt.x.tmp").write_bytes(b"torn")
    found = chaos.differences(bad, straight, wandb)
    assert any(f"final model.{name} differs" in d for d in found), found
    assert any("metrics.jsonl train/loss: event 7 is (8," in d for d in found), found
    assert any("temporary files left" in d for d in found), found
