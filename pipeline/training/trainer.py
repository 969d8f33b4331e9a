"""The training loop, top to bottom: the only module that knows the order of things.

    python -m pipeline train --config configs/jaychou.yaml [key=value ...]
    torchrun --standalone --nproc_per_node=2 -m pipeline train --config configs/jaychou.yaml

The step itself and the evaluation live in pipeline/training/step.py (the `eval` command and the
benchmarks run the same ones); this module orders everything around them.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import config as config_mod
from pipeline import dist, faults
from pipeline.config import Config
from pipeline.data.corpus import load_corpus
from pipeline.data.streams import eval_streams, make_train_streams
from pipeline.model.noise import Noise
from pipeline.model.rnn import build_model
from pipeline.run import checkpoint as ckpt
from pipeline.run import rundir
from pipeline.run.generate import samples
from pipeline.tracking.flops import Perf
from pipeline.tracking.metrics import TrainAccumulator
from pipeline.tracking.runlog import RunLog, RunRecord, best_summary, run_id_for
from pipeline.training import autoamp, gradsync, resume
from pipeline.training import budget as budget_mod
from pipeline.training.budget import TimeBudget
from pipeline.training.nonfinite import Diverged, NonFiniteGuard
from pipeline.training.optim import build_optimizer, lr_at, schedule_plans, warn_schedule_change
from pipeline.training.saver import Saver, check_room
from pipeline.training.state import TrainState, carried
from pipeline.training.step import check_precision_runs, evaluate, train_step
from pipeline.training.stopper import Stopper

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved after SIGTERM/SIGUSR1; launch/slurm.sbatch requeues


class Preempted(Exception):
    pass


# ---------------------------------------------------------------- set-up


def run(cfg: Config) -> dict:
    """Train on this process' rank. Returns the final metrics (rank 0's view = global)."""
    ctx = dist.init(cfg.train.device, cfg.train.threads, backend=cfg.dist.backend)
    try:
        return Trainer(cfg, ctx).fit()
    except BaseException as err:
        hung = dist.hung(err, cfg.train.dist_timeout) if dist.is_timeout(err) else None
        # The traceback keeps the trainer's frames alive, and with them the DDP model: drop
        # them before the process group goes, or gloo may abort at interpreter exit.
        traceback.clear_frames(err.__traceback__)
        if hung is not None:
            raise hung from None
        raise
    finally:
        rundir.release()
        dist.shutdown()


def _data(cfg: Config, ctx: dist.DistContext):
    """Every rank builds the same vocabulary and ids (a pure function of the corpus), then
    takes its own streams."""
    tcfg = cfg.train
    corpus = load_corpus(cfg.data, ctx)
    streams = make_train_streams(
        corpus.splits["train"],
        tcfg.sampling,
        tcfg.batch_size,
        tcfg.num_steps,
        ctx.rank,
        ctx.world_size,
        ctx.device,
        tcfg.seed,
    )
    dist.check_same(streams.epoch_size, "minibatches per epoch")
    valid = None
    if "validation" in corpus.splits:
        valid = eval_streams(corpus.splits["validation"], cfg.eval, tcfg.num_steps, ctx)
    return corpus.vocab, streams, valid


@dataclass
class Every:
    """A component's "when": every `steps` steps, else (steps = 0) at the end of every
    `epochs`-th epoch; never when both are 0."""

    steps: int
    epochs: int = 0

    def due(self, state: TrainState, end_of_epoch: bool) -> bool:
        if self.steps:
            return state.step % self.steps == 0
        return end_of_epoch and self.epochs > 0 and state.epoch % self.epochs == 0


# ---------------------------------------------------------------- the run


class Trainer:
    """One rank's run: its parts, its TrainState, and the loop (`fit`)."""

    def __init__(self, cfg: Config, ctx: dist.DistContext):
        tcfg = cfg.train
        self.cfg, self.ctx, self.run_dir = cfg, ctx, Path(cfg.run.dir)
        self.cfg_dict = config_mod.to_dict(cfg)
        self.log = print if ctx.is_main else (lambda *a, **k: None)
        self.runlog: RunLog | None = None  # the sinks, once the run directory is open
        rundir.lock(self.run_dir)  # before anything is read or written
        faults.slow_start(ctx.rank)
        self.vocab, self.streams, self.valid = _data(cfg, ctx)
        torch.manual_seed(tcfg.seed)  # the initial parameters: alike on every rank
        self.model = build_model(cfg.model, len(self.vocab)).to(ctx.device)
        self.params = list(self.model.parameters())
        self.optimizer = build_optimizer(tcfg, self.model)
        self.guard = NonFiniteGuard(tcfg.nonfinite_patience, ctx.device)
        self.faults = faults.from_env(ctx.rank, self.model)
        # A time budget plans the LR horizon unless the config gives it (a rerun of a budget
        # run's config.yaml); the cap stays the user's even when a resume adopts the plans.
        budget = tcfg.time_budget if not (tcfg.schedule_steps or tcfg.schedule_plans) else 0
        self.cap = self.total_steps = tcfg.max_steps or tcfg.epochs * self.streams.epoch_size
        self.state = self._resume(budget > 0)  # the precision decided too (self.amp)
        if self.faults:
            self.faults.after_resume()
        self.perf = Perf(self.model, self.streams, self.amp.mode, ctx)  # FLOPs/token, MFU
        self.grad_sync = gradsync.GradSync(  # after loading: rank 0's parameters everywhere
            cfg.dist.grad_sync, self.model, self.params, ctx, self.log
        )
        self.train_model = self.grad_sync.model  # DDP-wrapped for dist.grad_sync=ddp
        if tcfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.first_stream = ctx.rank * self.streams.b  # global index of this rank's row 0
        planned = not budget or tcfg.schedule_plans  # else the peak until the first plan
        self.plans = schedule_plans(tcfg, self.streams.epoch_size) if planned else []
        self.log_when = Every(tcfg.log_every, 1)
        self.eval_when = Every(tcfg.eval_every, tcfg.eval_every_epochs)
        self.save_when = Every(tcfg.checkpoint_every)
        self.budget = TimeBudget(budget, self.state.step, tcfg.warmup_steps)
        self.saver = Saver(self.run_dir, tcfg.keep_checkpoints, self.guard, self.log)
        self.val_step = -1
        self.saved_step = self.state.step if self.state.step else -1  # what last.pt holds
        check_room(self.run_dir, self.params, tcfg.optimizer)
        self._open_run_dir()
        self.last_train: dict = {}
        self.last_val: dict = {}
        self.diverged = ""  # the message when a save found non-finite values

    def _resume(self, budget: bool) -> TrainState:
        """The checkpoint to go on from (if any), loaded; a budget run goes on with the saved
        LR plans (and plans again with what is left)."""
        found = resume.find(self.cfg, self.run_dir, self.ctx.is_main, self.log)
        resume.check_agreed(found, self.run_dir)
        # train.amp=auto: the checkpoint's precision where this machine has it, else
        # measured (or kept) on rank 0; every rank uses one precision
        saved = found[1] if found else None
        self.amp = autoamp.for_run(
            self.cfg, self.ctx, self.model, self.streams, len(self.vocab), saved
        )
        check_precision_runs(self.model, self.amp, self.ctx.device, len(self.vocab))
        if not found:
            return TrainState()
        path, saved = found
        ckpt.check_compatible(saved, self.cfg_dict, self.vocab.to_list(), path)
        resume.load_into(
            saved, self.model, self.optimizer, self.amp.scaler, self.cfg.train, self.log
        )
        state = resume.position(
            saved, path, self.ctx.rank, self.streams, self.ctx.device, self.cfg.train.seed
        )
        was = saved["config"]["train"]
        if budget:
            self._adopt(**budget_mod.saved_plans(was))
        warn_schedule_change(was, self.cfg.train, self.streams.epoch_size, self.log)
        self.log(
            f"resumed from '{path}' at step {state.step} (epoch {state.epoch}, "
            f"minibatch {state.batch}; saved with {saved.get('world_size')} ranks)"
        )
        return state

    def _open_run_dir(self) -> None:
        """config.yaml, run.json and the sinks (metrics.jsonl, wandb, console)."""
        cfg, ctx, s = self.cfg, self.ctx, self.state
        if ctx.is_main:
            self._write_config()
        restarted = dist.restart_count() > 0
        s.run_id = run_id_for(s.run_id, self.run_dir, restarted, ctx.is_main)
        record = RunRecord(
            run_id=s.run_id,
            world_size=ctx.world_size,
            device=ctx.device.type,
            precision=self.amp.mode,
            precision_choice=self.amp.choice.summary(),
            resume_step=s.step,
            restarted=restarted,
            hold=cfg.train.checkpoint_every > 0,
        )
        self.runlog = RunLog(cfg, record, ctx.is_main, self.total_steps)
        self.log(
            f"{cfg.model.kind}: {sum(p.numel() for p in self.params):,} parameters, "
            f"vocabulary {len(self.vocab)}, {self.streams.epoch_size} minibatches/epoch, "
            f"world size {ctx.world_size}, device {ctx.device}, "
            f"precision {self.amp.choice.describe()}"
        )

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict:
        s, tcfg, streams = self.state, self.cfg.train, self.streams
        stopper = Stopper(tcfg.time_limit, tcfg.signal_check_every, self.ctx.world_size)
        self.first_step = s.step
        acc = TrainAccumulator(self.ctx.device)
        random = tcfg.sampling == "random"
        self.started = budget_mod.clock()
        reason = "" if s.step < self.total_steps and s.epoch < tcfg.epochs else "done"
        try:
            while not reason:
                began = budget_mod.clock()
                x_BT, y_BT = streams.batch(s.epoch, s.batch)
                hidden = carried(s, self.model, streams.b, random, self.ctx.device)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(tcfg, s.step, self.plans)
                noise = Noise(tcfg.seed, s.step, self.first_stream)
                dist.doing(f"training step {s.step + 1} (forward, gradient all-reduce)")
                if self.faults:
                    self.faults.before_step(s.step + 1)
                loss, norm, s.hidden = train_step(
                    self.train_model, self.params, x_BT, y_BT, hidden, self.optimizer,
                    self.amp, tcfg.clip, noise, self.guard, s.step, self.grad_sync,
                )  # fmt: skip
                acc.add(loss, x_BT.numel(), norm, tcfg.clip)
                end_of_epoch = s.advance(streams.epoch_size)
                if s.step == self.first_step + 1:  # start-up is over: collectives get bounded
                    dist.set_timeout(tcfg.dist_timeout)
                done = s.step >= self.total_steps or s.epoch >= tcfg.epochs
                dist.doing(f"the stop check after step {s.step}")
                reason, agreed = stopper.poll(s.step, self.guard, done, self.elapsed())
                reason = reason or ("done" if done else "")
                self.budget.count(s.step, budget_mod.clock() - began)

                due = "" if reason else self.budget.due(s.step, agreed)
                if due:
                    reason = self.spend_budget(due)
                if reason or self.log_when.due(s, end_of_epoch):
                    self.log_train(acc)
                # at the end always; when due also on a preemption (else the resumed run
                # would never evaluate this step: its val/* event and best.pt would be lost)
                forced = reason not in ("", "preempted", "diverged")
                if reason != "diverged" and (forced or self.eval_when.due(s, end_of_epoch)):
                    self.validate()
                periodic = self.save_when.due(s, end_of_epoch)
                if reason != "diverged" and (reason or periodic):
                    self.save(None if periodic else "last.pt", final=bool(reason))
                    self.runlog.commit()  # wandb gets the events up to this resumable point
        except Diverged as err:  # a save found non-finite values: the same on every rank
            reason, self.diverged = "diverged", str(err)
        finally:
            stopper.restore()
            self.runlog.console.close()
        return self.finish(reason)

    # ------------------------------------------------------------ what the loop calls

    def elapsed(self) -> float:
        """Seconds of training up to now, across resumes (for wall-time plots)."""
        return self.state.train_time + budget_mod.clock() - self.started

    def spend_budget(self, due: str) -> str:
        """Collective, when the budget says so (at a step, or at a stop check whose agreed
        elapsed time reached a mark): after the probe, arm the first plan; later plan (and
        re-plan) the LR horizon that ends the schedule at the time budget; once it is spent,
        stop ("time_budget", saved like a time limit). Returns the stop reason or ""."""
        b, s, tcfg = self.budget, self.state, self.cfg.train
        if due == "probe":
            b.after_probe()
            return ""
        if due == "spent":
            self._adopt(max_steps=s.step)  # a rerun of config.yaml stops here too
            self.log(
                f"time budget {tcfg.time_budget:g} s spent at step {s.step} (the LR schedule "
                f"ran to step {tcfg.schedule_steps}): stopping"
            )
            return "time_budget"
        if not b.evals:
            self.validate()  # this step's evaluation, timed: samples and best.pt included
        dist.doing(f"the time budget's plan at step {s.step}")
        step_s, eval_s, save_s, elapsed = dist.max_over_ranks(
            [b.step_seconds(), *b.costs(), self.elapsed()]
        )
        every_eval = tcfg.eval_every or tcfg.eval_every_epochs * self.streams.epoch_size
        horizon = b.plan(
            s.step, elapsed, step_s, eval_s, save_s, every_eval, tcfg.checkpoint_every,
            self.cap,
        )  # fmt: skip
        self.plans.append((s.step, horizon))
        # config.yaml then reruns this run: the same curve to the same end, nothing measured
        plans = [list(p) for p in self.plans]
        self._adopt(schedule_plans=plans, schedule_steps=horizon, max_steps=horizon)
        self.log(
            f"time budget {tcfg.time_budget:g} s, {elapsed:.0f} s spent: {step_s * 1e3:.1f} ms "
            f"a step, {eval_s:.2f} s an evaluation, {save_s:.2f} s a save (slowest rank) -> "
            f"the LR schedule ends at step {horizon} (train.schedule_steps in config.yaml)"
        )
        return ""

    def _adopt(self, **train_keys) -> None:
        """The one place a budget decision enters the run: train.* keys, the resolved config
        (checkpoints), the step count the loop runs to and, once the run directory is open,
        config.yaml and the progress display."""
        if not train_keys:
            return
        for key, value in train_keys.items():
            setattr(self.cfg.train, key, value)
        self.total_steps = self.cfg.train.max_steps
        self.cfg_dict = config_mod.to_dict(self.cfg)
        if self.runlog is not None:
            if self.ctx.is_main:
                self._write_config()
            self.runlog.console.set_total(self.total_steps)
            self.runlog.config_changed(train_keys)

    def _write_config(self) -> None:
        """run.dir/config.yaml: the resolved config, headed by the precision this machine used
        (a comment: train.amp=auto stays auto, so the file reruns as auto elsewhere)."""
        head = f"# precision used: {self.amp.mode} (train.amp={self.cfg.train.amp})\n"
        head += f"# {self.amp.choice.describe()}\n"
        text = head + config_mod.dump(self.cfg)
        (self.run_dir / "config.yaml").write_text(text, encoding="utf-8")

    def log_train(self, acc: TrainAccumulator) -> None:
        """Collective: the interval's sums reduced over ranks (the interval's one host read)."""
        s, ctx = self.state, self.ctx
        dist.doing(f"the metrics reduce at step {s.step}")
        self.last_train = {
            **acc.reduce(ctx.world_size),
            "epoch": s.epoch,
            "opt/lr": self.optimizer.param_groups[0]["lr"],
            "train/chars": s.step * self.cfg.train.batch_size * self.cfg.train.num_steps,
            "world_size": ctx.world_size,
            "precision": self.amp.mode,  # the one used: train.amp=auto resolved
            "time/elapsed_s": self.elapsed(),
        }
        self.last_train.update(self.perf.metrics(self.last_train["perf/tokens_per_s"]))
        if self.amp.mode == "fp16":
            self.last_train["amp/scale"] = self.amp.scaler.get_scale()
        if ctx.device.type == "cuda":  # the allocator's counter: no device sync
            self.last_train["perf/gpu_peak_gib"] = (
                torch.cuda.max_memory_allocated(ctx.device) / 2**30
            )
        self.runlog.train(s.step, self.last_train)

    def validate(self) -> None:
        """Collective: validation loss over the whole split (best.pt when it improved), then
        generated samples on rank 0."""
        s = self.state
        if self.val_step == s.step:  # the time budget evaluated this step already
            return
        self.val_step, began = s.step, budget_mod.clock()
        dist.doing(f"the evaluation at step {s.step}")
        if self.valid is not None:
            v = evaluate(self.model, self.valid, self.amp, self.ctx.device)
            self.last_val = {"val/loss": v["loss"], "val/perplexity": v["perplexity"]}
            self.last_val["val/bpc"] = v["bpc"]
            event = {**self.last_val, "epoch": s.epoch, "time/elapsed_s": self.elapsed()}
            self.runlog.log(s.step, event)
            self.log(
                f"step {s.step}: validation perplexity {v['perplexity']:.3f}, "
                f"{v['bpc']:.3f} bits/char over {int(v['tokens'])} characters"
            )
            if v["loss"] < s.best_val:
                s.best_val = v["loss"]
                if self.save("best.pt"):
                    self.runlog.best(s.best_val)
        if self.ctx.is_main and self.cfg.generate.prefixes:
            g, seed = self.cfg.generate, self.cfg.train.seed
            self.runlog.samples(s.step, samples(self.model, self.vocab, g, seed, self.ctx.device))
        self.budget.evals.append(budget_mod.clock() - began)

    def checkpoint(self) -> dict:
        """Collective (the hidden state is gathered): the complete, resumable run. Reads the
        run's state, changes nothing."""
        return {
            "format": ckpt.FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.amp.scaler.state_dict(),
            **self.state.to_checkpoint(self.cfg.train.sampling == "consecutive"),
            "train_time": self.elapsed(),  # seconds of training up to now, across resumes
            "world_size": self.ctx.world_size,
            "precision": self.amp.mode,  # the one used (train.amp=auto resolved)
            "vocab": self.vocab.to_list(),
            "config": self.cfg_dict,
        }

    def save(self, name: str | None, final: bool = False) -> bool:
        """Collective: `name`, or (None) a periodic checkpoint that last.pt then names; its
        time counts for the budget (best.pt's is part of an evaluation's). `final`: the
        run's last save (written inside a streak of skipped steps too). False when nothing
        was written (see Saver.save)."""
        began = budget_mod.clock()
        dist.doing(f"the checkpoint at step {self.state.step}")
        path = self.saver.save(self.checkpoint, self.state.step, name, final)
        if path is None:
            return False
        if name != "best.pt":
            self.saved_step = self.state.step  # what last.pt holds now
        self.runlog.saved(path, self.state.step)
        if name != "best.pt":
            self.budget.saves.append(budget_mod.clock() - began)
        return True

    def finish(self, reason: str) -> dict:
        s = self.state
        summary = {"final/step": s.step, "final/train_time_s": self.elapsed()}
        summary.update(best_summary(s.best_val) if s.best_val < math.inf else {})
        summary["world_size"] = self.ctx.world_size
        self.runlog.finish(summary)
        if reason == "preempted":
            where = ckpt.checkpoint_dir(self.run_dir) / "last.pt"
            if self.saved_step == s.step:
                self.log(f"preempted: saved step {s.step} to {where}")
            else:  # the save found nothing it may write (see Saver.save)
                held = f"step {self.saved_step}" if self.saved_step >= 0 else "nothing"
                self.log(f"preempted at step {s.step}: not saved; {where} holds {held}")
            raise Preempted(s.step)
        if reason == "diverged":
            raise Diverged(self.diverged or self.guard.message(self.guard.state()[1]))
        return {**self.last_train, **self.last_val, **summary, "reason": reason}
