"""The half-precision cross-entropy equals fp32 F.cross_entropy of the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import loss as loss_mod
from pipeline.loss import cross_entropy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_fp32_cross_entropy(dtype, reduction, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK", 7)  # several chunks, the last one partial
    torch.manual_seed(0)
    logits = (torch.randn(40, 300) * 4).to(dtype)
    target = torch.randint(0, 300, (40,))
    target[::5] = -100  # ignored rows get no loss and no gradient
    ref_in = logits.clone().float().requires_grad_()
    ref = F.cross_entropy(ref_in, target, ignore_index=-100, reduction=reduction)
    ref.backward()
    got_in = logits.clone().requires_grad_()
    got = cross_entropy(got_in, target, ignore_index=-100, reduction=reduction)
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert got_in.grad.dtype == dtype
    torch.testing.assert_close(
        got_in.grad.float(), ref_in.grad.to(dtype).float(), rtol=1e-2, atol=1e-5
    )
    assert torch.all(got_in.grad[::5] == 0)


def test_fp32_logits_take_torchs_own_path():
    logits = torch.randn(6, 9, requires_grad=True)
    target = torch.tensor([1, 2, 3, -100, 4, 5])
    assert torch.equal(cross_entropy(logits, target), F.cross_entropy(logits, target))
