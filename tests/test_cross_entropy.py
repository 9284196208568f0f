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


def _ragged_inputs(N=70, C=24, V=50, V_padded=64, seed=1):
    """70 tokens as 7 "sequences" of 10: sequence 2 (rows 20-29) is all ignored, others are
    ignored at random; with chunks of 8 rows, chunk 3 (rows 24-31) holds 6 ignored rows and
    chunk 2 (16-23) 4, and 70 = 8 * 8 + 6 leaves a ragged last chunk."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g)
    weight = torch.randn(V_padded, C, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.25] = IGNORE_INDEX
    targets[20:30] = IGNORE_INDEX
    targets[30:32] = IGNORE_INDEX  # so chunk 3 (rows 24-31) is wholly ignored
    return x, weight, targets


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 rows, elementwise blocks of 3 (not a divisor of 8): every boundary is hit."""
    import llmctl.cross_entropy as ce

    monkeypatch.setattr(ce, "_rows_per_chunk", lambda vocab: 8)
    monkeypatch.setattr(ce, "_rows_per_block", lambda vocab, device: 3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_and_gradients_equal_the_full_reference(small_chunks, reduction):
    V = 50
    x, weight, targets = _ragged_inputs(V=V)
    assert (targets[24:32] == IGNORE_INDEX).all() and (targets != IGNORE_INDEX).sum() > 30
    xa, wa = x.clone().requires_grad_(), weight.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = linear_cross_entropy(xa, wa, targets, V, reduction)
    ref = F.cross_entropy(F.linear(xb, wb[:V]).float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)) if reduction == "none" \
        else torch.tensor(0.37)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-6)
    assert wa.grad[V:].abs().sum() == 0  # padded rows
    assert xa.grad[20:32].abs().sum() == 0  # ignored tokens send nothing back
    assert wa.grad[:V].abs().sum() > 0


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_a_frozen_weight_or_a_frozen_input_gets_no_gradient(small_chunks, reduction):
    V = 50
    x, weight, targets = _ragged_inputs(V=V)
    for x_grad, w_grad in [(True, False), (False, True)]:
        xa, wa = x.clone().requires_grad_(x_grad), weight.clone().requires_grad_(w_grad)
        xb, wb = x.clone().requires_grad_(x_grad), weight.clone().requires_grad_(w_grad)
        linear_cross_entropy(xa, wa, targets, V, reduction).sum().backward()
        F.cross_entropy(F.linear(xb, wb[:V]), targets, reduction=reduction).sum().backward()
        for ours, ref in [(xa, xb), (wa, wb)]:
            if ours.requires_grad:
                torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-6)
            else:
                assert ours.grad is None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_under_bf16_autocast_matches_the_autocast_reference(small_chunks, reduction):
    V = 50
    x, weight, targets = _ragged_inputs(V=V)
    xa, wa = x.clone().requires_grad_(), weight.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        ours = linear_cross_entropy(xa, wa, targets, V, reduction)
        logits = F.linear(xb, wb[:V])
        assert logits.dtype == torch.bfloat16
        ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # the fp32 loss of the same bf16 logits
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)) if reduction == "none" \
        else torch.tensor(1.0)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert xa.grad.dtype == wa.grad.dtype == torch.float32
    for ours_grad, ref_grad in [(xa.grad, xb.grad), (wa.grad, wb.grad)]:
        scale = ref_grad.abs().max()
        torch.testing.assert_close(ours_grad, ref_grad, rtol=2e-2, atol=1e-2 * scale)
    assert wa.grad[V:].abs().sum() == 0 and xa.grad[20:32].abs().sum() == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_n_by_vocab_is_ever_made(small_chunks, reduction):
    """Forward and backward allocate at most a chunk's (8, V) logits, never (N, V)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    N, C, V, V_padded = 300, 8, 50, 64  # N x V = 15,000 elements; the weight 512, x 2,400
    x, weight, targets = _inputs(N=N, C=C, V=V, V_padded=V_padded)
    x.requires_grad_()
    weight.requires_grad_()
    with LargestOutput():
        loss = linear_cross_entropy(x, weight, targets, V, reduction)
        loss.backward(torch.ones_like(loss))
    assert x.grad is not None and weight.grad is not None
    assert LargestOutput.largest <= max(8 * V, N * C)


def test_the_benchmark_measures_the_same_step_in_every_implementation():
    """benchmarks/bench_cross_entropy.py: its copy of the previous implementation and the
    plain formula compute what linear_cross_entropy computes, loss and gradients alike."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_cross_entropy", REPO / "benchmarks" / "bench_cross_entropy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for dtype in ["float32", "bfloat16"]:
        rows = [bench.measure(v, dtype, tokens=40, d_model=16, vocab=100, steps=1) for v in bench.VARIANTS]
        for row in rows[1:]:
            for key in ["loss", "grad_x_norm", "grad_w_norm"]:
                assert row[key] == pytest.approx(rows[0][key], rel=1e-2 if dtype == "bfloat16" else 1e-5), (row, key)
        assert all(row["step_s"] > 0 for row in rows)  # peak_mb means something only in a fresh process
