"""Resume when conditions change: another precision or device, another optimizer or its
settings, another seed, ranks that do not see the same run directory or checkpoint; and the
last save after a skipped (non-finite) last step.

In-process runs (`pipeline.__main__.main`) unless a test needs processes (torchrun, faults).
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from conftest import TINY, kernels_run, load_ckpt, metrics, run_cli, sub_env, torchrun

from pipeline.__main__ import main
from pipeline.model.rnn import TorchRNN
from pipeline.training.optim import build_optimizer
from pipeline.training.precision import Amp
from pipeline.training.resume import load_into
from pipeline.training.trainer import PREEMPTED_EXIT

BASE = [*TINY, "data.max_chars=1200", "train.epochs=5", "train.threads=1"]
ADAM = ["train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.1"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
PRECISIONS = ["off", "bf16", "fp16"]


def train(run_dir, *overrides) -> int:
    return main(["train", *BASE, f"run.dir={run_dir}", *overrides])


# ---------------------------------------------------------------- precision and device


@pytest.fixture(scope="module")
def saved_in(tmp_path_factory):
    """saved_in(kind, amp, device) -> a run directory stopped at step 5 (consecutive sampling:
    the carried state is in the checkpoint), made once."""
    root, made = tmp_path_factory.mktemp("saved"), {}

    def get(kind: str, amp: str, device: str):
        if (kind, amp, device) not in made:
            run_dir = root / f"{kind}-{amp}-{device}"
            args = [f"model.kind={kind}", "model.num_layers=2", *ADAM, f"train.amp={amp}"]
            args += [f"train.device={device}", "train.max_steps=5"]
            assert train(run_dir, *args) == 0
            made[(kind, amp, device)] = run_dir
        return made[(kind, amp, device)]

    return get


@pytest.mark.parametrize("saved_dev", DEVICES)
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("saved_amp", PRECISIONS)
@pytest.mark.parametrize("amp", PRECISIONS)
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_a_checkpoint_resumes_in_every_precision_and_device(
    saved_in, tmp_path, kind, saved_amp, amp, saved_dev, dev
):
    """nn.RNN and nn.LSTM return their states in the compute dtype under autocast; carried and
    saved as such, a bf16 run's checkpoint crashed a resume in fp32 (dtype mismatch in the
    kernel). States are carried and saved in fp32 now, whatever the precision."""
    for a, d in ((saved_amp, saved_dev), (amp, dev)):
        if not kernels_run(kind, a, d):
            pytest.skip(f"this {d} has no {kind} kernel in {a} (see check_precision_runs)")
    run_dir = tmp_path / "run"
    shutil.copytree(saved_in(kind, saved_amp, saved_dev), run_dir)
    saved = load_ckpt(run_dir)
    assert saved["step"] == 5 and {h.dtype for h in saved["hidden"]} == {torch.float32}
    args = [f"model.kind={kind}", "model.num_layers=2", *ADAM, f"train.amp={amp}"]
    assert train(run_dir, *args, f"train.device={dev}", "train.max_steps=10") == 0
    final = load_ckpt(run_dir)
    assert final["step"] == 10 and final["precision"] == amp
    assert all(torch.isfinite(p).all() for p in final["model"].values())
    assert {h.dtype for h in final["hidden"]} == {torch.float32}


def test_a_checkpoint_with_half_precision_states_resumes_in_fp32(saved_in, tmp_path):
    """Checkpoints written before the fix hold bf16 states: loaded as fp32."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved_in("rnn", "off", "cpu"), run_dir)
    path = run_dir / "checkpoints" / "last.pt"
    old = torch.load(path, weights_only=True)
    old["hidden"] = [h.to(torch.bfloat16) for h in old["hidden"]]
    torch.save(old, path)
    args = ["model.kind=rnn", "model.num_layers=2", *ADAM, "train.amp=off"]
    assert train(run_dir, *args, "train.max_steps=10") == 0
    assert load_ckpt(run_dir)["step"] == 10


def test_a_precision_the_kernels_cannot_run_is_exit_2_naming_train_amp(tmp_path, capsys):
    if kernels_run("lstm", "bf16", "cpu"):
        pytest.skip("this CPU runs an LSTM in bf16 (native bf16)")
    assert train(tmp_path, "model.kind=lstm", "train.amp=bf16", "train.max_steps=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config key 'train.amp': bf16 does not run")
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


# ---------------------------------------------------------------- optimizer


def _trained_optimizer(tcfg, model):
    opt = build_optimizer(tcfg, model)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randint(0, 10, (2, 5))
        nll, _ = model(x, model.init_state(2, torch.device("cpu")), None, x)
        nll.mean().backward()
        opt.step()
    return opt


def _tcfg(**kw):
    from pipeline.config import TrainConfig

    return TrainConfig(**{"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, **kw})


@pytest.mark.parametrize(
    "now",
    [
        {"weight_decay": 0.0},
        {"betas": [0.8, 0.99]},
        {"weight_decay_params": "matrices"},
        {"optimizer": "adam"},
    ],
)
def test_changed_optimizer_settings_apply_and_keep_the_moments(now):
    """The new settings apply (load_state_dict alone kept the checkpoint's), every
    parameter keeps its own moments and step count (also when the grouping changes, so that
    the state's numbering does), and one line says what changed."""
    torch.manual_seed(0)
    model = TorchRNN("lstm", 10, 8, dropout=0.0)
    was = _tcfg()
    old = _trained_optimizer(was, model)
    saved = {
        "model": model.state_dict(),
        "optimizer": copy.deepcopy(old.state_dict()),
        "scaler": {},
        "config": {"train": {"optimizer": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.999]}},
    }
    moments = {p: copy.deepcopy(old.state[p]) for p in model.parameters()}
    tcfg = _tcfg(**now)
    fresh = build_optimizer(tcfg, model)
    said = []
    load_into(saved, model, fresh, Amp("off", torch.device("cpu")).scaler, tcfg, said.append)
    for group in fresh.param_groups:
        assert group["fused"] is True
        assert tuple(group["betas"]) == tuple(tcfg.betas)
        if "weight_decay_params" in now:
            assert group["weight_decay"] == (0.1 if group["params"][0].dim() >= 2 else 0.0)
        else:
            assert group["weight_decay"] == tcfg.weight_decay
    for p, st in moments.items():
        for key, value in st.items():
            assert torch.equal(fresh.state[p][key], value), key
    ((key, value),) = now.items()
    assert len(said) == 1 and f"train.{key}={value!r}" in said[0] and "moments carry" in said[0]


def test_another_optimizer_kind_starts_fresh_and_says_so(tmp_path, capsys):
    """adamw -> sgd: exit 1 in optimizer.step() before; now a warning and a fresh SGD."""
    assert train(tmp_path, *ADAM, "train.max_steps=5") == 0
    capsys.readouterr()
    assert train(tmp_path, "train.optimizer=sgd", "train.lr=0.5", "train.max_steps=8") == 0
    out = capsys.readouterr().out
    assert "trained with train.optimizer=adamw, this run uses sgd" in out and "starts fresh" in out
    final = load_ckpt(tmp_path)
    assert final["step"] == 8
    assert all("exp_avg" not in st for st in final["optimizer"]["state"].values())


def test_another_seed_inside_a_random_epoch_is_exit_2(tmp_path, capsys):
    """The seed orders the windows of an epoch: changed mid-epoch, windows would repeat and
    be skipped. At an epoch's end it may change."""
    random = ["train.sampling=random", "train.max_steps=5"]
    assert train(tmp_path, *random) == 0
    capsys.readouterr()
    assert train(tmp_path, "train.sampling=random", "train.max_steps=8", "train.seed=1") == 2
    err = capsys.readouterr().err
    assert "stopped inside epoch 0 of random sampling with train.seed=0" in err
    assert "train.seed=1" in err
    assert load_ckpt(tmp_path)["step"] == 5  # untouched


# ---------------------------------------------------------------- ranks agree


@pytest.mark.slow
def test_ranks_that_do_not_share_run_dir_are_exit_2(tmp_path):
    """Each rank's run.dir through ${oc.env:RANK}: two folders, as two nodes without a shared
    filesystem would have. Before: each rank resumed, saved and logged on its own."""
    args = ["train", *BASE, "train.max_steps=2", f"run.dir={tmp_path}/r${{oc.env:RANK}}"]
    out = torchrun(2, args, check=False, timeout=120)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert f"run directory '{tmp_path}/r0' is not shared: rank 1 on " in text, text
    assert not (tmp_path / "r0" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_ranks_that_would_resume_different_checkpoints_are_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "train.max_steps=6", "train.checkpoint_every=3") == 0
    cdir = run_dir / "checkpoints"
    shutil.copy(cdir / "step_00000003.pt", tmp_path / "r0.pt")
    shutil.copy(cdir / "step_00000006.pt", tmp_path / "r1.pt")
    args = ["train", *BASE, "train.max_steps=9", f"run.dir={tmp_path / 'two'}"]
    args.append(f"train.resume={tmp_path}/r${{oc.env:RANK}}.pt")
    out = torchrun(2, args, check=False, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "ranks disagree on the checkpoint to resume" in text, text
    assert f"rank 0: {tmp_path}/r0.pt at step 3; rank 1: {tmp_path}/r1.pt at step 6" in text


# ---------------------------------------------------------------- the last save


@pytest.mark.slow
def test_a_non_finite_last_step_still_saves_the_last_good_state(tmp_path):
    """A NaN at the last of 12 steps (checkpoint_every=0): before, "not saving last.pt",
    exit 0 and no checkpoint on disk. The skipped step changed nothing, so last.pt (step 12)
    holds the parameters of step 11."""
    args = ["train", *BASE, *ADAM]
    run_cli([*args, "train.max_steps=11", f"run.dir={tmp_path / 'eleven'}"])
    env = sub_env(PIPELINE_FAULTS="nan_loss:0:12")
    proc = run_cli([*args, "train.max_steps=12", f"run.dir={tmp_path / 'run'}"], env=env)
    last = load_ckpt(tmp_path / "run")
    assert last["step"] == 12 and "not saving" not in proc.stdout
    eleven = load_ckpt(tmp_path / "eleven")["model"]
    assert all(torch.equal(last["model"][k], eleven[k]) for k in eleven)


@pytest.mark.slow
def test_a_preemption_after_a_skipped_step_saves_and_says_so(tmp_path):
    args = ["train", *BASE, "train.max_steps=40", *ADAM, f"run.dir={tmp_path}"]
    env = sub_env(PIPELINE_FAULTS="nan_loss:0:7,sigterm:0:7", PYTHONUNBUFFERED=1)
    proc = run_cli([*args, "train.signal_check_every=1"], env=env, check=False)
    assert proc.returncode == PREEMPTED_EXIT, proc.stdout + proc.stderr
    assert f"preempted: saved step 7 to {tmp_path / 'checkpoints' / 'last.pt'}" in proc.stdout
    assert load_ckpt(tmp_path)["step"] == 7


@pytest.mark.slow
def test_a_preemption_at_a_validation_step_validates_before_it_saves(tmp_path):
    """Found by the chaos soak: preempted where validation was due, the run saved without it
    and the resumed run never did it (the step's val/* event and a best.pt were lost)."""
    args = ["train", *BASE, "data.valid_fraction=0.2", "train.eval_every=5", "train.max_steps=15"]
    run_cli([*args, f"run.dir={tmp_path / 'straight'}"])
    env = sub_env(PIPELINE_FAULTS="sigterm:0:10")
    run = [*args, "train.signal_check_every=1", f"run.dir={tmp_path / 'run'}"]
    proc = run_cli(run, env=env, check=False)
    assert proc.returncode == PREEMPTED_EXIT, proc.stdout + proc.stderr
    run_cli(run)
    vals = {d: metrics(tmp_path / d, "val/loss") for d in ("straight", "run")}
    assert [e["step"] for e in vals["run"]] == [5, 10, 15]
    assert [e["val/loss"] for e in vals["run"]] == [e["val/loss"] for e in vals["straight"]]
    best = {d: load_ckpt(tmp_path / d, "best.pt")["step"] for d in ("straight", "run")}
    assert best["run"] == best["straight"]
