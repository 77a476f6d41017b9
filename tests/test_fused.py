"""fused_divergence against the reference divergence on materialised logits: values and gradients."""

import pytest
import torch

from opsd import divergence, fused_divergence, sampled_token_loss


def inputs(dtype=torch.float64, B=3, L=7, H=16, V=50, scale=1.0, seed=0, separate_teacher=False):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, L, H, generator=g) * scale).to(dtype).requires_grad_(True)
    teacher = (torch.randn(B, L, H, generator=g) * scale).to(dtype).requires_grad_(True)
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_(True)
    teacher_weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_(True) if separate_teacher else None
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[0, 0] = True
    return student, teacher, weight, teacher_weight, mask


def both(student, teacher, weight, teacher_weight, mask, **kwargs):
    """(value, student grad, weight grad) from the reference and from the fused path."""
    results = []
    for fused in (False, True):
        student.grad = weight.grad = None
        if fused:
            loss = fused_divergence(student, teacher, weight, mask, teacher_weight=teacher_weight, **kwargs)
        else:
            chunk = kwargs.pop("chunk_size", None)
            head = weight if teacher_weight is None else teacher_weight
            loss = divergence(student @ weight.T, teacher @ head.T, mask, **kwargs)
            kwargs["chunk_size"] = chunk
        loss.backward()
        results.append((loss.detach(), student.grad.clone(), weight.grad.clone()))
    return results


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.02])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_fused_equals_reference_in_float64(beta, clip, temperature):
    (ref, ref_h, ref_w), (got, got_h, got_w) = both(*inputs(), beta=beta, clip=clip, temperature=temperature,
                                                    chunk_size=4)  # 4 does not divide the 14-odd tokens
    for a, b in ((got, ref), (got_h, ref_h), (got_w, ref_w)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_fused_equals_reference_in_float32_with_large_logits_and_a_separate_teacher(beta, clip):
    for scale in (1.0, 2500.0):  # 2500 makes logits of magnitude about 1e4 (H = 16, unit head weights)
        case = inputs(torch.float32, scale=scale, separate_teacher=True)
        if scale > 1:
            assert 5e3 < (case[0] @ case[2].T).abs().max() < 1e5
        (ref, ref_h, ref_w), (got, got_h, got_w) = both(*case, beta=beta, clip=clip, temperature=1.3, chunk_size=5)
        assert torch.isfinite(got) and torch.isfinite(got_h).all()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        for a, b in ((got_h, ref_h), (got_w, ref_w)):
            torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)


def test_teacher_side_gets_no_gradient_and_masked_rows_get_zero():
    student, teacher, weight, teacher_weight, mask = inputs(separate_teacher=True)
    fused_divergence(student, teacher, weight, mask, beta=0.5, teacher_weight=teacher_weight).backward()
    assert teacher.grad is None and teacher_weight.grad is None
    assert (student.grad[~mask] == 0).all() and (student.grad[mask].abs().sum(-1) > 0).all()


def test_flat_inputs_and_stats_match():
    student, teacher, weight, _, mask = inputs()
    flat = fused_divergence(student.reshape(-1, 16), teacher.reshape(-1, 16), weight, mask.reshape(-1), 0.5)
    stats, ref_stats = {}, {}
    nested = fused_divergence(student, teacher, weight, mask, 0.0, clip=0.02, stats=stats)
    divergence(student @ weight.T, teacher @ weight.T, mask, 0.0, clip=0.02, stats=ref_stats)
    assert flat.item() == pytest.approx(fused_divergence(student, teacher, weight, mask, 0.5).item(), abs=1e-12)
    assert nested.item() < stats["divergence"]
    assert stats == pytest.approx(ref_stats, abs=1e-12) and stats["clipped_mass"] > 0


def test_every_row_masked_gives_zero_loss_and_zero_gradient():
    student, teacher, weight, _, mask = inputs()
    loss = fused_divergence(student, teacher, weight, torch.zeros_like(mask), 0.5, clip=0.05)
    loss.backward()
    assert loss.item() == 0
    assert (student.grad == 0).all() and (weight.grad == 0).all()


def test_bfloat16_inputs_work_in_float32():
    student, teacher, weight, _, mask = inputs(torch.bfloat16)
    (ref, ref_h, ref_w), (got, got_h, got_w) = both(student, teacher, weight, None, mask, beta=0.5, chunk_size=3)
    assert got.dtype == torch.float32 and got_h.dtype == got_w.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h.float(), ref_h.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_w.float(), ref_w.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("clip", [None, 0.02])
def test_fused_sampled_token_loss_equals_the_reference(clip):
    student, teacher, weight, _, mask = inputs()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(1))
    stats, ref_stats = {}, {}
    ref = sampled_token_loss(student @ weight.T, teacher @ weight.T, ids, mask, temperature=1.3)
    ref.backward()
    ref_h, ref_w = student.grad.clone(), weight.grad.clone()
    divergence((student @ weight.T).detach(), teacher @ weight.T, mask, 0.5, 1.3, clip, ref_stats)
    student.grad = weight.grad = None
    got = fused_divergence(student, teacher, weight, mask, 0.5, 1.3, clip, chunk_size=4, stats=stats, sampled_ids=ids)
    got.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(student.grad, ref_h, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(weight.grad, ref_w, atol=1e-10, rtol=1e-10)
    assert stats == pytest.approx(ref_stats, abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 products with float32 sums (out_dtype) need CUDA")
def test_head_gradient_under_cuda_autocast_takes_bf16_products_and_stays_close(monkeypatch):
    student, teacher, weight, _, mask = inputs(torch.float32, H=64, V=512)
    student, teacher, weight = (t.detach().cuda().requires_grad_(True) for t in (student, teacher, weight))
    mask = mask.cuda()
    ref = both(student, teacher, weight, None, mask, beta=0.0, chunk_size=4)[1]
    calls, addmm = [], torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: (calls.append((a[1].dtype, k.get("out_dtype"))), addmm(*a, **k))[1])
    with torch.autocast("cuda", torch.bfloat16):
        got = both(student, teacher, weight, None, mask, beta=0.0, chunk_size=4)[1]
    assert calls and set(calls) == {(torch.bfloat16, torch.float32)}  # the tensor-core path was taken
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
