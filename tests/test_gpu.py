"""On a CUDA device (skipped with the reason elsewhere; launch/gpu_check.sh runs them with
`pytest -m gpu`): training in each precision, exact resume with dropout, resume across
devices, a format-1 checkpoint, two ranks sharing one GPU over gloo, and export. The hot
loop's host-read count on CUDA is tests/test_amp.py's, parametrized by device."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    ROOT,
    TINY,
    assert_same_params_across_world_sizes,
    load_ckpt,
    metrics,
    param_diffs,
    run_cli,
    sub_env,
    torchrun,
)

from pipeline.__main__ import main

pytestmark = pytest.mark.gpu

LSTM = ["model.kind=lstm", "model.num_layers=2", "model.hidden_size=64", "model.dropout=0.5"]
BASE = [*TINY, "train.threads=1", "logging.progress=off"]


def train(run_dir, *extra: str) -> None:
    assert main(["train", *BASE, f"run.dir={run_dir}", *extra]) == 0


def on_device(run_dir) -> dict:
    """The final checkpoint as saved (no map_location): where its tensors live."""
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["rnn_scratch", "lstm"])
def test_training_on_cuda_in_each_precision(tmp_path, kind, amp):
    run_dir = tmp_path / "run"
    extra = ["train.optimizer=adam", "train.lr=0.01"] if kind == "lstm" else ["train.lr=2.0"]
    train(
        run_dir, "train.device=cuda", f"model.kind={kind}", f"train.amp={amp}",
        "train.epochs=2", "train.log_every=25", *extra,
    )  # fmt: skip
    events = metrics(run_dir, "train/loss")
    first, last = events[0]["train/perplexity"], events[-1]["train/perplexity"]
    assert all(math.isfinite(e["train/loss"]) for e in events)
    assert last < 0.7 * first, (first, last)
    assert sum(e["opt/nonfinite_steps"] for e in events) <= 3
    assert all(e["precision"] == amp and e["perf/gpu_peak_gib"] > 0 for e in events)
    saved = on_device(run_dir)
    assert saved["precision"] == amp and all(t.is_cuda for t in saved["model"].values())
    mfu = [e.get("perf/mfu") for e in events]
    known = "perf/mfu" in events[0]  # the card is in pipeline.tracking.flops' table of peaks
    assert all((0 < m < 1) if known else m is None for m in mfu), mfu


@pytest.mark.parametrize("amp", ["off", "bf16"])
@pytest.mark.parametrize("sampling", ["consecutive", "random"])
def test_exact_resume_on_cuda_with_dropout(tmp_path, sampling, amp):
    """Straight == straight == stopped at step 6 and resumed to 12, bit for bit."""
    args = [*LSTM, "train.device=cuda", f"train.amp={amp}", f"train.sampling={sampling}"]
    args += ["train.optimizer=adamw", "train.lr=0.005", "train.epochs=10"]
    for name in ("a", "b"):
        train(tmp_path / name, *args, "train.max_steps=12")
    train(tmp_path / "c", *args, "train.max_steps=6")
    train(tmp_path / "c", *args, "train.max_steps=12")
    a, b, c = (on_device(tmp_path / n) for n in "abc")
    assert a["step"] == b["step"] == c["step"] == 12
    assert same(a["model"], b["model"]), "two straight runs differ"
    assert same(a["model"], c["model"]), "the resumed run differs from the straight one"


@pytest.mark.parametrize("first,then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_resume_across_devices(tmp_path, first, then):
    """6 steps on one device, resumed on the other to 12: the optimizer state (fused AdamW's
    step counts included) moves along; the result is the straight run's to the rounding of
    other kernels."""
    args = [*LSTM, "model.dropout=0", "train.optimizer=adamw", "train.lr=0.005"]
    args += ["train.epochs=10"]
    train(tmp_path / "moved", *args, f"train.device={first}", "train.max_steps=6")
    train(tmp_path / "moved", *args, f"train.device={then}", "train.max_steps=12")
    train(tmp_path / "straight", *args, f"train.device={then}", "train.max_steps=12")
    moved, straight = load_ckpt(tmp_path / "moved"), load_ckpt(tmp_path / "straight")
    where = on_device(tmp_path / "moved")["model"]["dense.weight"].device.type
    assert moved["step"] == 12 and where == then
    l2, _ = param_diffs(straight["model"], moved["model"])
    assert l2 < 1e-4, l2  # cuDNN vs CPU kernels for 6 steps: measured far below


def test_a_format_1_checkpoint_resumes_on_cuda(tmp_path):
    """tests/data/format1_lstm.pt (see test_resume.py) resumed on CUDA: fused AdamW's state
    (its step counts included) must come onto the device; step 4 matches the old code's
    CPU result to the rounding of other kernels."""
    old = torch.load(ROOT / "tests/data/format1_lstm.pt", weights_only=True)
    torch.save(old["checkpoint"], tmp_path / "start.pt")
    run_dir = tmp_path / "run"
    args = [*old["args"], f"run.dir={run_dir}", f"train.resume={tmp_path / 'start.pt'}"]
    assert main(["train", *args, "train.device=cuda"]) == 0
    final = load_ckpt(run_dir)
    assert final["step"] == 4
    then = old["then"]["model"]
    for k, v in final["model"].items():
        old_k = k.replace("rnn.0.", "rnn.").replace("rnn.1.", "rnn.")
        old_k = old_k.replace("_l0", f"_l{k[4]}") if k.startswith("rnn.") else k
        torch.testing.assert_close(v, then[old_k], rtol=1e-4, atol=1e-5)


def _first_gpu_only() -> dict:
    return sub_env(CUDA_VISIBLE_DEVICES="0")


@pytest.mark.slow
def test_two_ranks_on_one_gpu_over_gloo_match_one_process(tmp_path):
    args = [*BASE, *LSTM, "train.device=cuda", "train.max_steps=12", "train.log_every=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(["train", *args, f"run.dir={one}"], env=_first_gpu_only(), timeout=240)
    torchrun(
        2, ["train", *args, "dist.backend=gloo", f"run.dir={two}"], env=_first_gpu_only(),
        timeout=240,
    )  # fmt: skip
    a, b = load_ckpt(one), load_ckpt(two)
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["step"] == 12
    assert_same_params_across_world_sizes(a["model"], b["model"])
    mfu = [e.get("perf/mfu") for e in metrics(two, "train/loss")]
    one_mfu = [e.get("perf/mfu") for e in metrics(one, "train/loss")]
    assert (mfu[-1] is None) == (one_mfu[-1] is None)  # one GPU either way: one peak


@pytest.mark.slow
def test_nccl_with_two_ranks_on_one_gpu_is_refused(tmp_path):
    args = ["train", *BASE, "train.device=cuda", "dist.backend=nccl", f"run.dir={tmp_path / 'r'}"]
    proc = torchrun(2, args, env=_first_gpu_only(), timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in out.replace("exitcode :", "exitcode  :")
    assert "2 ranks on this node but 1 GPU(s)" in out and "dist.backend=gloo" in out


def test_export_of_a_cuda_trained_checkpoint(tmp_path, capsys):
    from safetensors.torch import load_file

    run_dir, folder = tmp_path / "run", tmp_path / "hf"
    train(
        run_dir, *LSTM, "model.tie_weights=true", "train.device=cuda", "data.valid_fraction=0.1",
        "train.max_steps=12", "train.eval_every=6",
    )  # fmt: skip
    best = run_dir / "checkpoints" / "best.pt"
    assert main(["export", "--checkpoint", str(best), "--out", str(folder)]) == 0
    saved = torch.load(best, weights_only=True, map_location="cpu")
    for key, tensor in load_file(folder / "model.safetensors").items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, saved["model"][key]), key
    capsys.readouterr()
    prefix = ["--prefix", "分开", "--length", "20"]
    assert main(["generate", "--checkpoint", str(best), *prefix]) == 0
    a = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(folder), *prefix]) == 0
    assert a == capsys.readouterr().out and a.startswith("分开")
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert meta["step"] == saved["step"]


def test_amp_auto_measures_on_cuda_and_leaves_the_run_alone(tmp_path):
    """amp=auto on CUDA: fp32, bf16 (where supported) and fp16 measured; the choice within 5%
    of the fastest and kept; the run equals the run with that precision set explicitly
    (CUDA kernels are deterministic here, as straight == straight shows above; compared to
    float rounding all the same, which is all CUDA promises)."""
    args = [*LSTM, "train.device=cuda", "train.max_steps=12", "train.optimizer=adamw"]
    train(tmp_path / "auto", *args, "train.amp=auto")
    chosen = load_ckpt(tmp_path / "auto")["precision"]
    kept = list((tmp_path / "cache" / "amp_auto").glob("*.json"))
    assert len(kept) == 1
    record = json.loads(kept[0].read_text())
    rates = record["tokens_per_s"]
    assert record["mode"] == chosen and rates[chosen] >= 0.95 * max(rates.values())
    assert {"off", "fp16"} <= set(rates) | set(record["failed"])
    head = (tmp_path / "auto" / "config.yaml").read_text(encoding="utf-8").splitlines()[1]
    assert "measured in" in head
    train(tmp_path / "explicit", *args, f"train.amp={chosen}")
    a, b = load_ckpt(tmp_path / "auto"), load_ckpt(tmp_path / "explicit")
    for key, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][key], rtol=1e-5, atol=1e-6)
    train(tmp_path / "again", *args, "train.amp=auto")
    head = (tmp_path / "again" / "config.yaml").read_text(encoding="utf-8").splitlines()[1]
    assert head.endswith(f"kept; {kept[0]})")
