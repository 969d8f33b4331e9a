"""Host memory between training steps (pipeline.training.hostmem), in real processes.

`rnn_scratch` on the whole Jay Chou corpus (vocabulary 2,614) at 128 streams frees blocks of
47 MB (the logits, their gradient) at the end of every step. With glibc's defaults they go
back to the kernel and come back the next step as zeroed pages, about 46,000 page faults a
step; `python -m pipeline` keeps them mapped: none, but for the heap growing by a block now
and then in the first steps. `perf/page_faults_per_step` (metrics.jsonl) shows which
happened; the first interval holds the warm-up, so the mean of the last two is read.
"""

from __future__ import annotations

import platform

import pytest
from conftest import ROOT, metrics, run_cli, sub_env

from pipeline.training import hostmem

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds: Linux with glibc only"
)

SCRATCH_WHOLE_CORPUS = [
    "train",
    "--config",
    str(ROOT / "configs/seed_scratch_consecutive.yaml"),
    "data.max_chars=0",
    "model.hidden_size=64",
    "train.batch_size=128",
    "train.max_steps=16",
    "train.log_every=4",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.threads=1",
    "train.device=cpu",  # host memory: on a CUDA machine the logits would live on the GPU
    "train.amp=off",
    "train.resume=never",
    "generate.prefixes=[]",
    "logging.wandb.mode=disabled",
    "logging.progress=off",
]


def _faults_per_step(run_dir, **env) -> float:
    run_cli([*SCRATCH_WHOLE_CORPUS, f"run.dir={run_dir}"], env=sub_env(**env))
    intervals = metrics(run_dir, "perf/page_faults_per_step")
    assert [e["step"] for e in intervals] == [4, 8, 12, 16]
    return sum(e["perf/page_faults_per_step"] for e in intervals[2:]) / 2


def test_training_steps_take_no_memory_back_from_the_kernel(tmp_path):
    assert _faults_per_step(tmp_path / "kept") < 10_000


@pytest.mark.parametrize(
    "env",
    [{"PIPELINE_KEEP_FREED_MEMORY": 0}, {"MALLOC_TRIM_THRESHOLD_": 128 * 1024}],
    ids=["glibc_defaults", "the_user_s_own"],
)
def test_turned_off_or_set_by_the_user_glibc_maps_the_blocks_afresh(tmp_path, env):
    """PIPELINE_KEEP_FREED_MEMORY=0: glibc's defaults. glibc's own variable for the trim
    threshold (at its default value): the pipeline sets nothing, and glibc (which then keeps
    its 128 KiB mmap threshold too) maps the step's blocks afresh each time."""
    assert _faults_per_step(tmp_path / "run", **env) > 30_000


def test_what_counts_as_the_user_s_own_setting(monkeypatch):
    for knob in (*hostmem.USER_KNOBS, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(knob, raising=False)
    assert not hostmem.user_tuned()
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libgomp.so.1")
    assert not hostmem.user_tuned()
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert hostmem.user_tuned()
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert hostmem.user_tuned()
