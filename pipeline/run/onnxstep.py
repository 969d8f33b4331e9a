"""One step of a model as ONNX (`export --onnx`), and generation with onnxruntime alone.

    python -m pipeline export --checkpoint runs/jaychou/checkpoints/best.pt --out jc --onnx
    python -m pipeline generate --checkpoint jc --onnx --prefix 分开 --length 50

`model.onnx` maps ids (batch, seq) and the recurrent state to logits (batch, seq, vocab) and
the new state; batch and sequence length are free. It is written by torch.onnx (the
TorchScript exporter: the dynamo one fixes an LSTM's sequence length) and checked before it
is kept: onnxruntime against PyTorch on a slice of the validation split, logits and state
within 1e-5 of their scale. `rnn_scratch` exports as the same tanh recurrence written as an
`nn.RNN` (identity input weights, W_hh transposed), since its hand-written autograd loop
would be traced for one fixed length. The ONNX packages are the optional extra `[onnx]`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

ONNX_FILE = "model.onnx"
TOLERANCE = 1e-5  # |onnxruntime - PyTorch| / max(1, max |PyTorch|), logits and state
CHECK_STREAMS, CHECK_STEPS = 4, 32  # the validation slice: 4 streams of 32 characters


class OnnxMismatch(RuntimeError):
    """model.onnx computes something else than the PyTorch model (a bug, not bad input)."""


def describe_io() -> str:
    return (
        "inputs `ids` (int64, batch x seq) and the state `h` (and `c` for an LSTM; float32, "
        "layers x batch x hidden, zeros to start), outputs `logits` (batch x seq x vocab; "
        "log-probabilities with an adaptive output) and the new state `h_out` (and `c_out`)."
    )


def _need(module: str):
    import importlib

    from pipeline.run.checkpoint import CheckpointError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckpointError(
            f"--onnx needs the package '{module}': pip install 'lyrics-rnn-pipeline[onnx]' "
            "(or .[onnx] in a checkout)"
        ) from None


def _step_module(model):
    """The model as an nn.Module of one call: (ids_BT, *state) -> (logits_BTV, *state)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pipeline.model.rnn import ScratchRNN

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            if isinstance(model, ScratchRNN):  # tanh(xw_t I + h W_hh): the same recurrence
                H = model.hidden_size
                self.cell = nn.RNN(H, H, bias=False)
                with torch.no_grad():
                    self.cell.weight_ih_l0.copy_(torch.eye(H))
                    self.cell.weight_hh_l0.copy_(model.W_hh.t())

        def forward(self, ids_BT, *state):
            m = self.model
            if isinstance(m, ScratchRNN):
                xw_TBH = F.embedding(ids_BT.t(), m.W_xh) + m.b_h
                h_TBH, h_out = self.cell(xw_TBH, state[0])
                return (h_TBH @ m.W_hq + m.b_q).transpose(0, 1), h_out
            logits_TBV, new = m(ids_BT, tuple(state))
            return (logits_TBV.transpose(0, 1), *new)

    return Step().eval()


def export_onnx(model, vocab, cfg, out: Path) -> str:
    """Write out/model.onnx and check it; returns a line saying what was checked."""
    import torch

    _need("onnx")
    ort = _need("onnxruntime")
    step = _step_module(model)
    state = model.init_state(2, "cpu")
    names = ["h", "c"][: len(state)]
    dyn = {"ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for name in names:
        dyn[name] = dyn[f"{name}_out"] = {1: "batch"}
    tmp = out / (ONNX_FILE + ".part")
    ids = torch.zeros(2, 3, dtype=torch.long)
    import warnings

    with warnings.catch_warnings():  # "batch_size other than 1 ... LSTM": the state is an input
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            (ids, *state),
            str(tmp),
            input_names=["ids", *names],
            output_names=["logits", *(f"{n}_out" for n in names)],
            dynamic_axes=dyn,
            dynamo=False,
        )
    try:
        ids_BT, where = _check_slice(cfg, vocab)
        session = _session(ort, tmp)
        worst = _compare(step, session, names, ids_BT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if worst > TOLERANCE:
        tmp.unlink()
        raise OnnxMismatch(
            f"model.onnx differs from the PyTorch model by {worst:.2e} (relative to the "
            f"values' scale) on {where}, more than {TOLERANCE:g}: not written"
        )
    tmp.replace(out / ONNX_FILE)
    return f"model.onnx checked against PyTorch on {where}: largest difference {worst:.1e}"


def _session(ort, path: Path):
    """One thread: a step of one stream is too small to share, and idle pool threads spin."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_slice(cfg, vocab) -> tuple[np.ndarray, str]:
    """CHECK_STREAMS x CHECK_STEPS ids from the validation split (the training split without
    one; seeded random ids when the corpus cannot be read here), and what they are."""
    from pipeline.data.common import DataError
    from pipeline.data.corpus import load_corpus

    n = CHECK_STREAMS * CHECK_STEPS
    try:
        corpus = load_corpus(cfg.data)
        split = "validation" if "validation" in corpus.splits else "train"
        ids = np.asarray(corpus.splits[split][:n], dtype=np.int64)
        if corpus.vocab.to_list() == vocab.to_list() and len(ids) == n:
            where = f"{n} characters of the {split} split"
            return ids.reshape(CHECK_STREAMS, CHECK_STEPS), where
    except (DataError, OSError, ValueError):
        pass
    ids = np.random.default_rng(0).integers(0, len(vocab), n)
    return ids.reshape(CHECK_STREAMS, CHECK_STEPS), f"{n} random ids (corpus not readable here)"


def _compare(step, session, names, ids_BT: np.ndarray) -> float:
    """Run both on the slice in two halves, the second from the state the first left: the
    largest difference of logits and state, relative to max(1, max |PyTorch's|)."""
    import torch

    half = ids_BT.shape[1] // 2
    state_t = step.model.init_state(ids_BT.shape[0], "cpu")
    state_o = [s.numpy() for s in state_t]
    worst = 0.0
    with torch.no_grad():
        for chunk in (ids_BT[:, :half], ids_BT[:, half:]):
            ref = step(torch.from_numpy(chunk), *state_t)
            got = session.run(None, {"ids": chunk, **dict(zip(names, state_o))})
            for r, g in zip(ref, got):
                r = r.numpy()
                scale = max(1.0, float(np.abs(r).max()))
                worst = max(worst, float(np.abs(g - r).max()) / scale)
            state_t, state_o = ref[1:], got[1:]
    return worst if math.isfinite(worst) else math.inf


def generate_onnx(
    folder: str | Path,
    prefix: str,
    length: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
) -> str:
    """`prefix` and `length` characters from the folder's model.onnx and config.json, with
    onnxruntime and numpy (no PyTorch model). Greedy text equals `generate`'s; sampled text
    draws from numpy's generator, so it differs from PyTorch's for the same seed."""
    from pipeline.data.vocab import Vocab
    from pipeline.run.checkpoint import CheckpointError
    from pipeline.run.generate import check_prefix

    folder = Path(folder)
    path = folder / ONNX_FILE
    if not path.is_file():
        raise CheckpointError(
            f"'{path}' does not exist: --onnx takes a folder exported with `export --onnx`"
        )
    ort = _need("onnxruntime")
    try:
        meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        vocab = Vocab(list(meta["vocab"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"'{folder / 'config.json'}' is not readable ({err})") from None
    check_prefix(prefix, vocab)
    try:
        session = _session(ort, path)
    except Exception as err:  # onnxruntime raises its own classes for a bad file
        raise CheckpointError(f"'{path}' is not a usable ONNX model ({err})") from None
    feeds = {  # zero states: (layers, batch 1, hidden)
        i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        for i in session.get_inputs()
        if i.name != "ids"
    }
    rng = np.random.default_rng(seed)
    ids = [vocab.stoi[c] for c in prefix]
    x = np.asarray([ids], dtype=np.int64)
    for _ in range(length):
        logits, *state = session.run(None, {"ids": x, **feeds})
        feeds = dict(zip(feeds, state))
        nxt = _pick(logits[0, -1].astype(np.float64), temperature, top_k, rng)
        ids.append(nxt)
        x = np.asarray([[nxt]], dtype=np.int64)
    return vocab.decode(ids)


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k and top_k < len(z):
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(len(z), p=p / p.sum()))
