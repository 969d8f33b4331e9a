"""Text from a prefix: greedy (the chapter's predict_rnn) or temperature / top-k sampling."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.vocab import Vocab
from pipeline.model.noise import GAMMA, fmix64


class PrefixError(ValueError):
    pass


def check_prefix(prefix: str, vocab: Vocab) -> None:
    if not prefix:
        raise PrefixError("the prefix is empty: give at least one character")
    missing = vocab.missing(prefix)
    if missing:
        raise PrefixError(
            f"prefix {prefix!r} has characters outside the vocabulary "
            f"({len(vocab)} characters): {' '.join(repr(c) for c in missing)}"
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    vocab: Vocab,
    prefix: str,
    length: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> str:
    """`prefix` followed by `length` generated characters."""
    check_prefix(prefix, vocab)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    ids = [vocab.stoi[c] for c in prefix]
    state = model.init_state(1, device)
    x = torch.tensor([ids], device=device)
    for _ in range(length):
        logits_TBV, state = model(x, state)
        logits = logits_TBV[-1, 0].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        ids.append(nxt)
        x = torch.tensor([[nxt]], device=device)
    model.train(was_training)
    return vocab.decode(ids)


SAMPLE_SALT = (
    0x5A3E1E  # sets the samples' seeds apart from the dropout masks' (pipeline.model.noise)
)


def sample_seed(seed: int, index: int) -> int:
    """The seed of the sample of generate.prefixes[index] in a run seeded `seed`: a stream of
    its own for every prefix (two mixes of SplitMix64's finalizer), so prefixes do not share
    their draws; the same on every rerun and every world size (rank 0 draws them alone)."""
    return fmix64(fmix64(seed * GAMMA + SAMPLE_SALT) + index * GAMMA)


def samples(model: nn.Module, vocab: Vocab, gcfg, seed: int, device) -> list[tuple[str, str]]:
    """(prefix, text) for each of generate.prefixes, as a training run shows them at an
    evaluation, each drawn with its own seed (`sample_seed`); a prefix the vocabulary cannot
    take is reported in its text, not raised."""
    rows = []
    for i, prefix in enumerate(gcfg.prefixes):
        own = sample_seed(seed, i)
        try:
            text = generate(
                model, vocab, prefix, gcfg.length, gcfg.temperature, gcfg.top_k, own, device
            )
        except PrefixError as err:
            text = f"(skipped: {err})"
        rows.append((prefix, text))
    return rows
