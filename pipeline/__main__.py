"""Command line: python -m pipeline {train,generate,eval,prepare,export,compare} ...

    python -m pipeline train --config configs/jaychou.yaml train.max_steps=40
    torchrun --standalone --nproc_per_node=2 -m pipeline train --config configs/jaychou.yaml
    python -m pipeline generate --checkpoint runs/jaychou/checkpoints/last.pt --prefix 分开
    python -m pipeline eval --checkpoint runs/jaychou/checkpoints/best.pt --split validation
    python -m pipeline prepare --config configs/songci.yaml
    python -m pipeline export --checkpoint runs/jaychou/checkpoints/best.pt --out jaychou-lstm
    python -m pipeline compare runs/a runs/b --plot compare.png

Problems with the input (config keys, data files, checkpoints, prefixes, a run directory
held by another job) print one clear line and exit with status 2; a preempted run exits with
75 after saving; a diverged run 65, a full disk 74, a hung collective 124 (README, "When
things go wrong").
"""

from __future__ import annotations

import argparse
import sys


def _user_errors():
    from pipeline.config import ConfigError
    from pipeline.data.common import DataError
    from pipeline.data.vocab import VocabError
    from pipeline.run.checkpoint import CheckpointError
    from pipeline.run.generate import PrefixError

    return (ConfigError, DataError, CheckpointError, PrefixError, VocabError)


def cmd_train(args) -> int:
    from pipeline import config

    cfg = config.load(args.config, args.overrides)  # before importing torch: typos fail fast
    if args.print_config:
        print(config.dump(cfg), end="")
        return 0
    from pipeline.dist import HUNG_EXIT, Hung
    from pipeline.run.checkpoint import DISK_FULL_EXIT, DiskFull
    from pipeline.training.nonfinite import DIVERGED_EXIT, Diverged
    from pipeline.training.trainer import PREEMPTED_EXIT, Preempted, run

    try:
        run(cfg)
    except Preempted:
        return PREEMPTED_EXIT
    except (Diverged, DiskFull, Hung) as err:  # one line, no traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        return {Diverged: DIVERGED_EXIT, DiskFull: DISK_FULL_EXIT, Hung: HUNG_EXIT}[type(err)]
    return 0


def _load_model(path: str, device: str = "cpu"):
    from pipeline.run.export import load_any

    return load_any(path, device)


def cmd_generate(args) -> int:
    if args.onnx:
        from pipeline.run.onnxstep import generate_onnx

        for k in range(args.num_samples):
            seed = None if args.seed is None else args.seed + k
            how = (args.length, args.temperature or 0.0, args.top_k or 0, seed)
            print(generate_onnx(args.checkpoint, args.prefix, *how))
        return 0
    from pipeline.run.generate import generate

    model, vocab, cfg, _ = _load_model(args.checkpoint, args.device)
    for k in range(args.num_samples):
        seed = None if args.seed is None else args.seed + k
        print(
            generate(
                model,
                vocab,
                args.prefix,
                args.length,
                args.temperature or 0.0,
                args.top_k or 0,
                seed=seed,
                device=args.device,
            )
        )
    return 0


def cmd_eval(args) -> int:
    import json

    from pipeline import dist
    from pipeline.data.common import DataError
    from pipeline.data.corpus import load_corpus
    from pipeline.data.streams import eval_streams
    from pipeline.training.precision import Amp
    from pipeline.training.step import evaluate

    ctx = dist.init(args.device)
    try:
        model, vocab, cfg, state = _load_model(args.checkpoint, str(ctx.device))
        corpus = load_corpus(cfg.data, ctx)
        if args.split not in corpus.splits:
            raise DataError(
                f"split '{args.split}' does not exist for this corpus "
                f"(available: {sorted(corpus.splits)})"
            )
        if corpus.vocab.to_list() != vocab.to_list():
            raise DataError("the corpus now gives a different vocabulary than the checkpoint's")
        ids, steps = corpus.splits[args.split], cfg.train.num_steps
        streams = eval_streams(ids, cfg.eval, steps, ctx, args.batch_size or 0, args.max_chars)
        out = evaluate(model, streams, Amp(args.amp, ctx.device), ctx.device)
        if ctx.is_main:
            print(
                json.dumps(
                    {
                        "checkpoint": args.checkpoint,
                        "step": state["step"],
                        "split": args.split,
                        **out,
                    }
                )
            )
        del model
    finally:
        dist.shutdown()
    return 0


def cmd_prepare(args) -> int:
    from pipeline import config, dist
    from pipeline.data.corpus import load_corpus

    cfg = config.load(args.config, args.overrides)
    ctx = dist.init("cpu")
    try:
        corpus = load_corpus(cfg.data, ctx, full_check=args.verify)
        if ctx.is_main:
            sizes = ", ".join(f"{k} {len(v):,}" for k, v in corpus.splits.items())
            print(f"prepared: vocabulary {len(corpus.vocab)}; characters per split: {sizes}")
    finally:
        dist.shutdown()
    return 0


def cmd_export(args) -> int:
    from pipeline.run.export import export
    from pipeline.run.onnxstep import OnnxMismatch

    try:
        out = export(args.checkpoint, args.out, web=args.web, onnx=args.onnx)
    except OnnxMismatch as err:  # a bug in an exporter or a runtime: not written
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    files = ["model.safetensors", "config.json", "README.md"]
    files += ["index.html", "lyrics.js"] if args.web else []
    files += ["model.onnx"] if args.onnx else []
    print(f"exported '{args.checkpoint}' to '{out}' ({', '.join(files)})")
    if args.web:
        print(f"the page: python -m http.server -d {out} 8000, then open http://127.0.0.1:8000/")
    return 0


def cmd_compare(args) -> int:
    from pipeline.tracking.compare import compare

    return compare(args.runs, args.plot)


def positive(kind, zero_ok: bool = False):
    """An argparse type: a number of `kind` that must be > 0 (>= 0 with `zero_ok`), else exit
    status 2, naming it."""

    def parse(text: str):
        value = kind(text)
        if not (value >= 0 if zero_ok else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero_ok else '>'} 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    from pipeline.keys import help_text

    t = sub.add_parser(
        "train",
        help="train a model (also under torchrun)",
        description="Train a model; the same command under torchrun trains on every rank.",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", help="YAML file in configs/")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=40")
    t.add_argument("--print-config", action="store_true", help="print the resolved YAML; exit")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="continue a prefix with a trained model")
    g.add_argument("--checkpoint", required=True, help="a checkpoint file or an exported folder")
    g.add_argument("--prefix", required=True)
    g.add_argument("--length", type=positive(int), default=50)
    g.add_argument(
        "--temperature",
        type=positive(float),
        default=None,
        help="sample at this temperature (default: greedy, as the chapter)",
    )
    g.add_argument("--top-k", type=positive(int), default=None, help="default: all characters")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--num-samples", type=positive(int), default=1)
    g.add_argument("--device", default="cpu")
    g.add_argument(
        "--onnx",
        action="store_true",
        help="run the exported folder's model.onnx with onnxruntime (no PyTorch model)",
    )
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="loss, perplexity and bits/char over a whole split")
    e.add_argument("--checkpoint", required=True, help="a checkpoint file or an exported folder")
    e.add_argument("--split", default="validation")
    e.add_argument(
        "--batch-size",
        type=positive(int),
        default=None,
        help="default: the config's eval.batch_size",
    )
    e.add_argument(
        "--max-chars", type=positive(int, True), default=0, help="the first N characters (0: all)"
    )
    e.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"])
    e.add_argument("--device", default="auto")
    e.set_defaults(fn=cmd_eval)

    pr = sub.add_parser("prepare", help="build the prepared-data cache ahead of a job")
    pr.add_argument("--config", required=True)
    pr.add_argument("overrides", nargs="*")
    pr.add_argument("--verify", action="store_true", help="sha256 every prepared file again")
    pr.set_defaults(fn=cmd_prepare)

    x = sub.add_parser("export", help="write a Hugging Face model folder from a checkpoint")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="the folder to write (created)")
    x.add_argument(
        "--web",
        action="store_true",
        help="add index.html + lyrics.js: generation in a browser from the folder's files",
    )
    x.add_argument(
        "--onnx", action="store_true", help="add model.onnx (one step), checked with onnxruntime"
    )
    x.set_defaults(fn=cmd_export)

    c = sub.add_parser("compare", help="table and plot of runs from their metrics.jsonl")
    c.add_argument("runs", nargs="+")
    c.add_argument("--plot", default="compare.png")
    c.set_defaults(fn=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def entry() -> None:
    """`python -m pipeline` and the `lyrics-rnn` console script: a traceback for a bug, then
    an exit that survives gloo's teardown (pipeline.dist.leave)."""
    from pipeline.training.hostmem import keep_freed_memory

    keep_freed_memory()  # the whole process: steps reuse the host memory they free
    try:
        code = main()
    except Exception:
        if "pipeline.dist" not in sys.modules:
            raise
        import traceback

        traceback.print_exc()
        code = 1
    dist = sys.modules.get("pipeline.dist")
    if dist is None:
        sys.exit(code)
    dist.leave(code)


if __name__ == "__main__":
    entry()
