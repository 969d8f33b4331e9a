"""The chapter's from-scratch training loop, re-implemented by us for comparison (not copied),
and the one home of the chapter's reference pieces: the benchmark's seed row and the tests
(`from bench.seed_reference import ...`: the model, streams, clipping and training-loop tests
compare the pipeline with these) use the same code. This module imports nothing from tests.

Faithful to the chapter's code path, including what makes it slow: one-hot input matrices
built with `scatter_` for every time step (`to_onehot`), the per-step Python loop `rnn()`
with the output layer applied inside it, `grad_clipping` that reads the norm with `.item()`,
`d2l.sgd` as a Python loop over parameters, and `l.item()` after every minibatch. Data as
in the chapter: the first 10,000 characters with newlines as spaces, `data_iter_consecutive`,
hidden 256, batch 32, 35 steps, lr 100, clip 0.01. Only the vocabulary order differs (sorted
instead of `list(set(...))`), which changes no cost.

    python -m bench.seed_reference --epochs 5       # prints perplexity and tokens/s
"""

from __future__ import annotations

import argparse
import math
import random
import time
import zipfile

import torch
from torch import nn

from pipeline.config import DataConfig
from pipeline.data.corpus import BUILTIN, locate_builtin


def load_data_jay_lyrics(max_chars: int = 10000):
    data = DataConfig()
    with zipfile.ZipFile(locate_builtin(data)) as zf:
        text = zf.read(BUILTIN["jaychou"].member).decode("utf-8")
    text = text.replace("\n", " ").replace("\r", " ")[:max_chars]
    idx_to_char = sorted(set(text))
    char_to_idx = {c: i for i, c in enumerate(idx_to_char)}
    return [char_to_idx[c] for c in text], char_to_idx, idx_to_char, len(idx_to_char)


def data_iter_consecutive(corpus_indices, batch_size, num_steps, device=None):
    corpus_indices = torch.tensor(corpus_indices, dtype=torch.float32, device=device)
    batch_len = len(corpus_indices) // batch_size
    indices = corpus_indices[0 : batch_size * batch_len].view(batch_size, batch_len)
    for i in range((batch_len - 1) // num_steps):
        i = i * num_steps
        yield indices[:, i : i + num_steps], indices[:, i + 1 : i + num_steps + 1]


# Copied from d2l-zh (PyTorch), d2lzh_pytorch/utils.py; only `example_indices` can be given
# instead of drawn, so that the reference can be fed our permutation (tests/test_streams.py,
# tests/test_train_core.py).
def data_iter_random(corpus_indices, batch_size, num_steps, device=None, example_indices=None):
    # 减1是因为输出的索引x是相应输入的索引y加1
    num_examples = (len(corpus_indices) - 1) // num_steps
    epoch_size = num_examples // batch_size
    if example_indices is None:
        example_indices = list(range(num_examples))
        random.shuffle(example_indices)

    # 返回从pos开始的长为num_steps的序列
    def _data(pos):
        return corpus_indices[pos : pos + num_steps]

    for i in range(epoch_size):
        # 每次读取batch_size个随机样本
        i = i * batch_size
        batch_indices = example_indices[i : i + batch_size]
        X = [_data(j * num_steps) for j in batch_indices]
        Y = [_data(j * num_steps + 1) for j in batch_indices]
        yield (
            torch.tensor(X, dtype=torch.float32, device=device),
            torch.tensor(Y, dtype=torch.float32, device=device),
        )


def one_hot(x, n_class, dtype=torch.float32):
    result = torch.zeros(x.shape[0], n_class, dtype=dtype, device=x.device)
    result.scatter_(1, x.long().view(-1, 1), 1)
    return result


def to_onehot(X, n_class):
    return [one_hot(X[:, i], n_class) for i in range(X.shape[1])]


def get_params(num_inputs, num_hiddens, num_outputs, device):
    def _one(shape):
        return nn.Parameter(torch.zeros(shape, device=device).normal_(0, 0.01))

    return (
        _one((num_inputs, num_hiddens)),
        _one((num_hiddens, num_hiddens)),
        nn.Parameter(torch.zeros(num_hiddens, device=device)),
        _one((num_hiddens, num_outputs)),
        nn.Parameter(torch.zeros(num_outputs, device=device)),
    )


def rnn(inputs, state, params):
    W_xh, W_hh, b_h, W_hq, b_q = params
    (H,) = state
    outputs = []
    for X in inputs:
        H = torch.tanh(torch.matmul(X, W_xh) + torch.matmul(H, W_hh) + b_h)
        outputs.append(torch.matmul(H, W_hq) + b_q)
    return outputs, (H,)


def grad_clipping(params, theta, device):
    norm = torch.tensor([0.0], device=device)
    for param in params:
        norm += (param.grad.data**2).sum()
    norm = norm.sqrt().item()
    if norm > theta:
        for param in params:
            param.grad.data *= theta / norm


def sgd(params, lr, batch_size):
    for param in params:
        param.data -= lr * param.grad / batch_size


def train_minibatch(params, X, Y, state, vocab_size, loss, lr, theta, device):
    """One minibatch of the chapter's train_and_predict_rnn, from the carried (detached)
    `state`: forward, loss, gradients, clipping, d2l.sgd(params, lr, 1). Returns the loss
    tensor, the number of targets and the new state."""
    outputs, state = rnn(to_onehot(X, vocab_size), state, params)
    outputs = torch.cat(outputs, dim=0)
    y = torch.flatten(Y.T)
    l = loss(outputs, y.long())  # noqa: E741 (the chapter's name)
    if params[0].grad is not None:
        for param in params:
            param.grad.data.zero_()
    l.backward()
    grad_clipping(params, theta, device)
    sgd(params, lr, 1)
    return l, y.shape[0], state


class SeedTrainer:
    """The chapter's train_and_predict_rnn with is_random_iter=False, resumable in chunks of
    minibatches so a benchmark can interleave it with other variants."""

    def __init__(
        self,
        device="cpu",
        num_hiddens=256,
        batch_size=32,
        num_steps=35,
        lr=100.0,
        clipping_theta=0.01,
        max_chars=10000,
        seed=0,
    ):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.corpus, _, _, self.vocab_size = load_data_jay_lyrics(max_chars)
        self.num_hiddens, self.batch_size, self.num_steps = num_hiddens, batch_size, num_steps
        self.lr, self.theta = lr, clipping_theta
        self.params = get_params(self.vocab_size, num_hiddens, self.vocab_size, self.device)
        self.loss = nn.CrossEntropyLoss()
        self.batches = iter(())
        self.state = None
        self.l_sum, self.n = 0.0, 0
        self.epochs_done = -1

    def _next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # new epoch: fresh iterator, state reset (consecutive sampling)
            self.epochs_done += 1
            self.last_perplexity = math.exp(self.l_sum / self.n) if self.n else math.nan
            self.l_sum, self.n = 0.0, 0
            self.batches = data_iter_consecutive(
                self.corpus, self.batch_size, self.num_steps, self.device
            )
            self.state = (torch.zeros((self.batch_size, self.num_hiddens), device=self.device),)
            return next(self.batches)

    def step(self) -> int:
        """One minibatch; returns the number of tokens trained on."""
        X, Y = self._next_batch()
        for s in self.state:
            s.detach_()
        l, n, self.state = train_minibatch(  # noqa: E741 (the chapter's name)
            self.params, X, Y, self.state, self.vocab_size, self.loss, self.lr, self.theta,
            self.device,
        )  # fmt: skip
        self.l_sum += l.item() * n
        self.n += n
        return n

    def epoch_size(self) -> int:
        return (len(self.corpus) // self.batch_size - 1) // self.num_steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    trainer = SeedTrainer(args.device)
    tokens, t0 = 0, time.perf_counter()
    for _ in range(args.epochs * trainer.epoch_size()):
        tokens += trainer.step()
    seconds = time.perf_counter() - t0
    print(
        f"epochs {args.epochs}: perplexity {math.exp(trainer.l_sum / trainer.n):.3f}, "
        f"{tokens / seconds:.0f} tokens/s ({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
