"""A Hugging Face model folder from a checkpoint, and loading either kind back.

    python -m pipeline export --checkpoint runs/jaychou/checkpoints/best.pt --out jaychou-lstm
    huggingface-cli upload USER/jaychou-lstm jaychou-lstm     # the folder goes up as it is

The folder holds `model.safetensors` (the weights only; a tied embedding/output matrix is
stored once), `config.json` (the model config, the vocabulary and the run's resolved config:
enough to rebuild the model, and for `eval` the data split, without our checkpoint) and
`README.md`, a model card. Loading a folder reads JSON and safetensors, never a pickle, so
it runs no code from the folder; `generate` and `eval` take a folder wherever they take a
checkpoint, with the same output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline import config as config_mod
from pipeline.data.vocab import Vocab
from pipeline.model.rnn import build_model
from pipeline.run import checkpoint as ckpt

FORMAT = 1  # config.json's "lyrics_rnn_format"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
WEB_DIR = Path(__file__).parent / "web"  # the page `--web` copies into the folder
WEB_FILES = ("index.html", "lyrics.js")


def load_any(path: str | Path, device="cpu"):
    """(model in eval mode, vocab, Config, info with "step") from a checkpoint file or an
    exported folder. A bad file of either kind is a CheckpointError naming it."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, device)
    state = ckpt.load(path)
    cfg = config_mod.from_dict(state["config"])
    vocab = Vocab(list(state["vocab"]))
    model = build_model(cfg.model, len(vocab))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), vocab, cfg, state


def _load_folder(folder: Path, device):
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    meta = _read_config(folder)
    cfg = config_mod.from_dict(meta["config"])
    vocab = Vocab(list(meta["vocab"]))
    model = build_model(cfg.model, len(vocab))
    weights = folder / WEIGHTS
    try:
        missing, unexpected = load_model(model, weights, strict=False)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ckpt.CheckpointError(
            f"'{weights}' is not a usable safetensors file ({str(err).splitlines()[0]})"
        ) from None
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"'{weights}' does not fit the model config.json describes (missing: "
            f"{sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )
    return model.to(device).eval(), vocab, cfg, meta


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ckpt.CheckpointError(f"'{path}' is missing or not JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("lyrics_rnn_format") != FORMAT:
        raise ckpt.CheckpointError(
            f"'{path}' is not a lyrics-rnn model config (lyrics_rnn_format {FORMAT} expected)"
        )
    for key in ("config", "vocab", "model"):
        if key not in meta:
            raise ckpt.CheckpointError(f"'{path}' has no '{key}'")
    return meta


def export(
    checkpoint: str | Path,
    out: str | Path,
    sample_length: int = 80,
    web: bool = False,
    onnx: bool = False,
) -> Path:
    """Write the folder `out` (created; an earlier export's files replaced or removed); `web`
    adds the page (index.html, lyrics.js), `onnx` model.onnx, checked against the model."""
    from safetensors.torch import save_model

    from pipeline.run.generate import samples

    model, vocab, cfg, state = load_any(checkpoint)
    if Path(checkpoint).is_dir():
        raise ckpt.CheckpointError(f"'{checkpoint}' is already an exported folder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / WEIGHTS).chmod(0o644)
    cfg_dict = state["config"]
    best = state.get("best_val_loss", math.inf)
    meta = {
        "lyrics_rnn_format": FORMAT,
        "library_name": "lyrics-rnn",
        "model_type": cfg.model.kind,
        "vocab_size": len(vocab),
        "model": cfg_dict["model"],
        "vocab": vocab.to_list(),
        "step": state["step"],
        "train_time_s": state.get("train_time", 0.0),
        "world_size": state.get("world_size", 1),
        "best_val_loss": best if math.isfinite(best) else None,
        "precision": state.get("precision", cfg.train.amp),
        "config": cfg_dict,
    }
    (out / CONFIG).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    first = next(c for c in vocab.to_list() if len(c) == 1 and not c.isspace())
    gcfg = config_mod.GenerateConfig(
        prefixes=cfg.generate.prefixes[:1] or [first], length=sample_length
    )
    (_, sample), *_ = samples(model, vocab, gcfg, cfg.train.seed, "cpu")
    from pipeline.run.onnxstep import ONNX_FILE, export_onnx

    for name in (*WEB_FILES, ONNX_FILE):  # an earlier export's, which may not fit these weights
        (out / name).unlink(missing_ok=True)
    if onnx:
        print(export_onnx(model, vocab, cfg, out))
    if web:
        for name in WEB_FILES:
            (out / name).write_bytes((WEB_DIR / name).read_bytes())
    (out / CARD).write_text(model_card(meta, cfg, sample, web, onnx), encoding="utf-8")
    return out


def model_card(meta: dict, cfg, sample: str, web: bool = False, onnx: bool = False) -> str:
    from huggingface_hub import ModelCardData

    from pipeline.model.loss import LN2, perplexity

    d, m, t = cfg.data, cfg.model, cfg.train
    corpus = d.path if d.source in ("text", "hf") else f"the built-in corpus {d.corpus}"
    best = meta["best_val_loss"]
    quality = (
        f"validation loss {best:.4f} nats, perplexity {perplexity(best):.2f}, "
        f"{best / LN2:.3f} bits/char"
        if best is not None
        else "no validation split was held out"
    )
    budget = f"a {t.time_budget:g} s time budget, " if t.time_budget else ""
    head = ModelCardData(library_name="lyrics-rnn", tags=["char-rnn", m.kind, "lyrics"])
    lines = [
        f"- Corpus: {corpus} (data.source={d.source}, data.max_chars={d.max_chars}, "
        f"data.valid_fraction={d.valid_fraction}); {meta['vocab_size']} characters.",
        f"- Model: {m.kind}, {m.num_layers} layer(s) of {m.hidden_size}, embedding "
        f"{m.embedding_size or m.hidden_size}, dropout {m.dropout} ({m.dropout_kind}), "
        f"tied weights {m.tie_weights}, adaptive cutoffs {list(m.adaptive_cutoffs)}.",
        f"- Training: {meta['step']} steps ({budget}{meta['train_time_s']:.0f} s of training "
        f"on {meta['world_size']} rank(s)), global batch {t.batch_size} x {t.num_steps} "
        f"characters, {t.optimizer} at lr {t.lr:g}, schedule {t.schedule}, precision "
        f"{meta['precision']}.",
        f"- Quality: {quality}.",
    ]
    return f"""---
{head.to_yaml()}
---

# {cfg.run.name}: a character-level {m.kind} language model

Trained with lyrics-rnn, a training pipeline that starts from the chapter "循环神经网络" of
*Dive into Deep Learning*.

{chr(10).join(lines)}

A greedy sample:

```
{sample}
```

## How to use

```bash
# in a checkout of lyrics-rnn, after `make install`:
huggingface-cli download USER/NAME --local-dir model
python -m pipeline generate --checkpoint model --prefix 分开 --length 50
python -m pipeline eval --checkpoint model --split validation   # needs the corpus locally
```

`model.safetensors` holds the weights, `config.json` the model config, the vocabulary and
the resolved training config.
{_web_section() if web else ""}{_onnx_section() if onnx else ""}"""


def _web_section() -> str:
    return """
## In a browser

`index.html` and `lyrics.js` generate from this folder's own files in any browser, with
nothing installed and nothing fetched from elsewhere. Serve the folder and open the page:

```bash
python -m http.server -d model 8000     # then open http://127.0.0.1:8000/
```

A link can carry a sample: `http://127.0.0.1:8000/?prefix=分开&length=100` generates on load
(greedy unless it also gives `temperature`, `top_k` and `seed`).
"""


def _onnx_section() -> str:
    from pipeline.run.onnxstep import ONNX_FILE, describe_io

    return f"""
## ONNX

`{ONNX_FILE}` is one step of the model for any ONNX runtime: {describe_io()}
`python -m pipeline generate --checkpoint model --onnx --prefix 分开` runs it with onnxruntime.
"""
