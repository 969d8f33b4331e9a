"""Resuming loses nothing: K steps straight == k steps, stop, resume, K - k steps, bit for bit
on CPU; the same after a damaged last.pt (fallback) and after SIGTERM (preemption, exit 75).
train.resume=never protects a run directory; incompatible state is an error (exit 2).

Runs are in-process (`pipeline.__main__.main`), except the preempted one, which needs a
process to signal. k = 25 is in the middle of the first epoch (37 minibatches of
data.max_chars=1200); the resumed part crosses an epoch boundary.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, TINY, load_ckpt, run_cli, sub_env

from pipeline.__main__ import main
from pipeline.training.trainer import PREEMPTED_EXIT

K, k, EPOCH = 60, 25, 37
# One thread everywhere: the SIGTERM run is a subprocess (OMP_NUM_THREADS=1), and on some
# CPUs oneDNN's LSTM rounds differently with 1 and 2 threads.
BASE = [*TINY, "data.max_chars=1200", "train.epochs=5", "train.log_every=20", "train.threads=1"]
LSTM = [
    "model.kind=lstm",
    "model.num_layers=2",
    "model.dropout=0.3",
    "train.optimizer=adam",
    "train.lr=0.01",
]
CASES = {
    # the chapter's model; the hidden state of every stream is carried across the stop
    "consecutive": ["train.sampling=consecutive"],
    # cosine with warmup: train.schedule_steps fixes its length whatever max_steps says
    "random_cosine": [
        "train.sampling=random",
        "train.schedule=cosine",
        "train.warmup_steps=5",
        f"train.schedule_steps={K}",
    ],
    # dropout on the embedding, between the layers and before the output: masks of (seed,
    # step, global stream), nothing to restore; a validation split evaluates (model.eval())
    # at the stop and at the epoch end
    "consecutive_dropout": ["train.sampling=consecutive", *LSTM, "data.valid_fraction=0.1"],
    # locked (per stream) dropout and weight drop on the recurrent weights
    "random_dropout": [
        "train.sampling=random",
        *LSTM,
        "model.dropout_kind=locked",
        "model.weight_drop=0.2",
    ],
}


def train(run_dir, *overrides) -> int:
    return main(["train", *BASE, f"run.dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted K-step run of a case (computed once per case)."""
    root, done = tmp_path_factory.mktemp("straight"), {}

    def get(case: str) -> dict:
        if case not in done:
            assert train(root / case, *CASES[case], f"train.max_steps={K}") == 0
            done[case] = load_ckpt(root / case)
        return done[case]

    return get


def assert_same_params(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == K
    unequal = [n for n in a["model"] if not torch.equal(a["model"][n], b["model"][n])]
    assert not unequal, f"parameters differ: {unequal}"


@pytest.mark.parametrize("case", list(CASES))
def test_stop_and_resume_equals_straight_run(straight, tmp_path, capsys, case):
    assert train(tmp_path, *CASES[case], f"train.max_steps={k}") == 0
    mid = load_ckpt(tmp_path)
    assert (mid["step"], mid["epoch"], mid["batch_in_epoch"]) == (k, 0, k)
    if "consecutive" in case:  # the GLOBAL state: (layers, batch_size, hidden) per tensor
        assert [tuple(h.shape) for h in mid["hidden"]] == [
            (2 if "dropout" in case else 1, 4, 32)
        ] * (2 if "dropout" in case else 1)
    capsys.readouterr()
    assert train(tmp_path, *CASES[case], f"train.max_steps={K}") == 0  # resume=auto
    assert (
        f"resumed from '{tmp_path / 'checkpoints' / 'last.pt'}' at step {k}"
        in capsys.readouterr().out
    )
    assert_same_params(load_ckpt(tmp_path), straight(case))


def test_damaged_last_falls_back_to_newest_good_and_says_so(straight, tmp_path, capsys):
    case = CASES["consecutive"]
    assert train(tmp_path, *case, f"train.max_steps={k}", "train.checkpoint_every=10") == 0
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk
    capsys.readouterr()
    assert train(tmp_path, *case, f"train.max_steps={K}", "train.checkpoint_every=10") == 0
    out = capsys.readouterr().out
    assert f"checkpoint '{last}' cannot be loaded: truncated or corrupt" in out
    assert "falling back to" in out and "step_00000020.pt" in out
    assert "at step 20 (epoch 0, minibatch 20" in out
    assert_same_params(load_ckpt(tmp_path), straight("consecutive"))


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes_exactly(straight, tmp_path, capsys):
    """Preemption of a real process, with dropout: a real SIGTERM at a known step (the
    process sends it to itself before step 7, PIPELINE_FAULTS), so nothing races the run."""
    case = CASES["consecutive_dropout"]
    args = ["train", *BASE, f"run.dir={tmp_path}", *case, f"train.max_steps={K}"]
    args.append("train.checkpoint_every=2")
    proc = run_cli(args, timeout=240, env=sub_env(PIPELINE_FAULTS="sigterm:0:7"), check=False)
    assert proc.returncode == PREEMPTED_EXIT, proc.stdout + proc.stderr
    saved = load_ckpt(tmp_path)
    assert saved["step"] == 7  # the signal's step: agreed on at once by the lone rank
    assert "preempted: saved step 7" in proc.stdout
    capsys.readouterr()
    assert train(tmp_path, *case, f"train.max_steps={K}", "train.checkpoint_every=2") == 0
    assert "at step 7" in capsys.readouterr().out
    assert_same_params(load_ckpt(tmp_path), straight("consecutive_dropout"))


def test_resume_never_protects_the_run_dir(straight, tmp_path, capsys):
    case = CASES["consecutive"]
    assert train(tmp_path, *case, f"train.max_steps={k}") == 0
    capsys.readouterr()
    assert train(tmp_path, *case, f"train.max_steps={K}", "train.resume=never") == 2
    err = capsys.readouterr().err
    assert f"run directory '{tmp_path}' already holds a run" in err and "run.overwrite" in err
    assert load_ckpt(tmp_path)["step"] == k  # untouched
    assert (
        train(tmp_path, *case, f"train.max_steps={K}", "train.resume=never", "run.overwrite=true")
        == 0
    )
    assert "resumed from" not in capsys.readouterr().out
    assert_same_params(load_ckpt(tmp_path), straight("consecutive"))  # a fresh start


def test_resume_refuses_a_position_beyond_a_shorter_corpus(tmp_path, capsys):
    """data.* may change between runs; a saved minibatch index past the new epoch may not
    (the loop would read empty slices and never reach the epoch's end)."""
    text = tmp_path / "abc.txt"
    text.write_text("abcdefghij\n" * 200, encoding="utf-8")  # same vocabulary when cut
    run, case = tmp_path / "run", [*CASES["consecutive"], f"data.path={text}"]
    assert train(run, *case, "data.max_chars=1100", f"train.max_steps={k}") == 0  # 34 a epoch
    capsys.readouterr()
    assert train(run, *case, "data.max_chars=330", f"train.max_steps={K}") == 2  # 10 a epoch
    err = capsys.readouterr().err
    assert f"stopped after minibatch {k} of epoch 0" in err and "corpus changed" in err
    assert load_ckpt(run)["step"] == k  # untouched


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("saved")
    assert train(run_dir, *CASES["consecutive"], "train.max_steps=3") == 0
    return run_dir


@pytest.mark.parametrize(
    "override,named",
    [
        ("train.batch_size=8", "train.batch_size=4"),
        ("train.num_steps=4", "train.num_steps=8"),
        ("train.sampling=random", "train.sampling='consecutive'"),
        ("model.hidden_size=16", "model.hidden_size=32"),
        ("model.kind=gru", "model.kind='rnn_scratch'"),
        ("model.adaptive_div=2", "model.adaptive_div=4"),
        ("data.newlines=keep", "a different vocabulary"),
    ],
)
def test_incompatible_state_is_exit_2_naming_it(saved_run, capsys, override, named):
    capsys.readouterr()
    assert train(saved_run, *CASES["consecutive"], "train.max_steps=6", override) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{saved_run / 'checkpoints' / 'last.pt'}' has" in err and named in err


def test_other_cosine_length_is_said(tmp_path, capsys):
    cosine = ["train.schedule=cosine", "train.max_steps=3"]
    assert train(tmp_path, *CASES["consecutive"], *cosine) == 0
    capsys.readouterr()
    assert train(tmp_path, *CASES["consecutive"], *cosine, "train.max_steps=5") == 0
    assert (
        "cosine LR schedule spanned 3 steps in the checkpoint and spans 5 now"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("first,then", [("off", "fp16"), ("fp16", "off")])
def test_resume_under_another_amp_mode(tmp_path, first, then):
    """Every mode takes the fused optimizer kernels (they take the non-finite skip on the
    device); a checkpoint of either mode resumes under the other, and the saved param
    groups say fused, also after a resume from a checkpoint saved without (format 1)."""
    case = CASES["consecutive"]
    assert train(tmp_path, *case, f"train.amp={first}", f"train.max_steps={k}") == 0
    assert train(tmp_path, *case, f"train.amp={then}", "train.max_steps=40") == 0
    state = load_ckpt(tmp_path)
    assert state["step"] == 40
    assert all(torch.isfinite(p).all() for p in state["model"].values())
    fused = {g.get("fused") for g in state["optimizer"]["param_groups"]}
    assert fused == {True}


def test_a_format_1_checkpoint_resumes_where_the_old_code_went_on(tmp_path, capsys):
    """tests/data/format1_lstm.pt was made by the code before the per-layer cells (git
    672301d): a 2-layer LSTM's checkpoint at step 2, stacked keys (`rnn.weight_ih_l1`) and
    an AdamW state, and the weights that code reached at step 4. Resumed now, the weights
    map onto the per-layer cells and the optimizer state onto the same parameters: step 4
    matches (dropout 0; other kernels for the cells, so to float rounding)."""
    old = torch.load(ROOT / "tests/data/format1_lstm.pt", weights_only=True)
    ckpt = old["checkpoint"]
    assert ckpt["format"] == 1 and "rnn.weight_ih_l1" in ckpt["model"] and ckpt["step"] == 2
    torch.save(ckpt, tmp_path / "start.pt")
    run_dir = tmp_path / "run"
    # on the CPU, as the old code was: the comparison is to float rounding (test_gpu.py
    # resumes it on CUDA)
    args = [*old["args"], f"run.dir={run_dir}", f"train.resume={tmp_path / 'start.pt'}"]
    assert main(["train", *args, "train.device=cpu"]) == 0, capsys.readouterr().err
    final = load_ckpt(run_dir)
    assert final["step"] == old["then"]["step"] == 4
    then = old["then"]["model"]
    stacked = {  # the old names of the new per-layer keys
        k: k.replace("rnn.0.", "rnn.").replace("rnn.1.", "rnn.").replace("_l0", f"_l{k[4]}")
        if k.startswith("rnn.")
        else k
        for k in final["model"]
    }
    for k, old_k in stacked.items():
        torch.testing.assert_close(final["model"][k], then[old_k], rtol=1e-5, atol=1e-6)
