"""The fused output layer + cross-entropy equals the textbook F.linear + F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.cross_entropy import IGNORE_INDEX, linear_cross_entropy


def _inputs(N=70, C=24, V=50, V_padded=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g)
    weight = torch.randn(V_padded, C, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = IGNORE_INDEX  # SFT-style positions without loss
    return x, weight, targets


def _reference(x, weight, targets, V, reduction):
    logits = F.linear(x, weight)[:, :V]
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_loss_and_gradients_match_the_textbook_formula(reduction):
    V = 50
    x, weight, targets = _inputs(V=V)
    xa, wa = x.clone().requires_grad_(), weight.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = linear_cross_entropy(xa, wa, targets, V, reduction)
    ref = _reference(xb, wb, targets, V, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.7)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-6)
    assert wa.grad[V:].abs().sum() == 0  # padding rows are never scored, so never trained


def test_under_bf16_autocast_the_loss_is_exactly_the_fp32_loss_of_the_bf16_logits():
    V = 50
    x, weight, targets = _inputs(V=V)
    with torch.autocast("cpu", torch.bfloat16):
        ours = linear_cross_entropy(x, weight, targets, V)
        logits = F.linear(x, weight)[:, :V]
    assert logits.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_blocks_of_rows_do_not_change_the_result(monkeypatch):
    """Several row blocks (a large vocabulary) give what one block gives."""
    import llmctl.cross_entropy as ce

    V = 50
    x, weight, targets = _inputs(N=37, V=V)
    xa = x.clone().requires_grad_()
    one = linear_cross_entropy(xa, weight, targets, V, "sum")
    one.backward()
    monkeypatch.setattr(ce, "_rows_per_block", lambda vocab, device: 5)
    xb = x.clone().requires_grad_()
    many = linear_cross_entropy(xb, weight, targets, V, "sum")
    many.backward()
    torch.testing.assert_close(one, many)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_all_targets_ignored_gives_zero_sum_and_zero_gradient():
    x, weight, targets = _inputs()
    targets[:] = IGNORE_INDEX
    xa = x.clone().requires_grad_()
    loss = linear_cross_entropy(xa, weight, targets, 50, "sum")
    loss.backward()
    assert loss.item() == 0 and xa.grad.abs().sum() == 0


def test_unknown_reduction_is_refused():
    x, weight, targets = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, weight, targets, 50, "max")
