"""The divergences against a plain per-token loop in float64, the properties the method relies on, and the
loss of one batch (opsd_loss) against its definition on a tiny model."""

import math

import pytest
import torch
from conftest import make_model

from opsd import completion_logits, divergence, opsd_loss, sampled_token_loss


def reference(student_logits, teacher_logits, mask, beta, temperature, clip):
    """One token at a time, straight from the definitions: Eq. 7 of the paper and its two KL limits."""
    total, count = 0.0, 0
    for b, l in mask.nonzero().tolist():
        p_s = torch.softmax(student_logits[b, l] / temperature, -1).tolist()
        p_t = torch.softmax(teacher_logits[b, l] / temperature, -1).tolist()
        token = 0.0
        for s, t in zip(p_s, p_t):
            if beta == 0:
                term = t * math.log(t / s)
            elif beta == 1:
                term = s * math.log(s / t)
            else:
                m = beta * t + (1 - beta) * s
                term = beta * t * math.log(t / m) + (1 - beta) * s * math.log(s / m)
            token += term if clip is None else min(term, clip)
        total, count = total + token, count + 1
    return total / count


def random_inputs(seed=0, B=3, L=5, V=11, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    teacher = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[0, 0] = True
    return student, teacher, mask


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_divergence_equals_a_per_token_loop(beta, clip, temperature):
    student, teacher, mask = random_inputs()
    got = divergence(student, teacher, mask, beta, temperature, clip)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference(student, teacher, mask, beta, temperature, clip), abs=1e-12)


def test_the_clip_binds_and_the_stats_report_it():
    student, teacher, mask = random_inputs()
    stats, clipped_stats = {}, {}
    free = divergence(student, teacher, mask, 0.0, 1.0, None, stats)
    capped = divergence(student, teacher, mask, 0.0, 1.0, 0.05, clipped_stats)
    assert capped < free
    assert stats["divergence"] == pytest.approx(free.item()) == pytest.approx(clipped_stats["divergence"])
    assert stats["clipped_mass"] == 0 and 0 < clipped_stats["clipped_mass"] <= 1


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_zero_divergence_and_zero_gradient_when_teacher_equals_student(beta):
    student, _, mask = random_inputs()
    student.requires_grad_(True)
    loss = divergence(student, student.detach().clone(), mask, beta, 1.3)
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert student.grad.abs().max() < 1e-12


def test_forward_and_reverse_kl_directions():
    student, teacher, mask = random_inputs()
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    forward = (p_t * (p_t.log() - p_s.log())).sum(-1)[mask].mean()
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1)[mask].mean()
    assert divergence(student, teacher, mask, beta=0.0).item() == pytest.approx(forward.item(), abs=1e-12)
    assert divergence(student, teacher, mask, beta=1.0).item() == pytest.approx(reverse.item(), abs=1e-12)
    assert abs(forward - reverse) > 1e-3  # the test can tell them apart


@pytest.mark.parametrize("sampled", [False, True])
def test_gradients_reach_only_the_student_and_only_completion_positions(sampled):
    student, teacher, mask = random_inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    ids = torch.randint(0, 11, mask.shape)
    loss = sampled_token_loss(student, teacher, ids, mask) if sampled else divergence(student, teacher, mask, 0.5)
    loss.backward()
    assert teacher.grad is None
    per_position = student.grad.abs().sum(-1)  # (B, L)
    assert (per_position[~mask] == 0).all()
    assert (per_position[mask] > 0).all()


def test_fully_masked_batch_gives_zero_loss_and_no_nan():
    student, teacher, mask = random_inputs()
    student.requires_grad_(True)
    loss = divergence(student, teacher, torch.zeros_like(mask), 0.5)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(student.grad).all()


def test_float32_and_bfloat16_logits_are_computed_in_float32():
    student, teacher, mask = random_inputs(dtype=torch.float32)
    exact = divergence(student.double(), teacher.double(), mask, 0.5).item()
    assert divergence(student, teacher, mask, 0.5).dtype == torch.float32
    assert divergence(student, teacher, mask, 0.5).item() == pytest.approx(exact, rel=1e-5)
    assert divergence(student.bfloat16(), teacher.bfloat16(), mask, 0.5).dtype == torch.float32


def test_sampled_token_loss_value_and_gradient():
    student, teacher, mask = random_inputs()
    student.requires_grad_(True)
    ids = torch.randint(0, 11, mask.shape)
    loss = sampled_token_loss(student, teacher, ids, mask, temperature=1.0)
    s = student.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    t = teacher.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    advantage = (t - s).detach()
    assert loss.item() == pytest.approx((-advantage * s)[mask].mean().item(), abs=1e-12)
    loss.backward()
    # d/dz of -A log p_S(y) = -A (onehot(y) - p_S), at each masked position, over the token count
    expected = -advantage[..., None] * (torch.nn.functional.one_hot(ids, 11) - student.softmax(-1)) / mask.sum()
    torch.testing.assert_close(student.grad, torch.where(mask[..., None], expected, 0).detach())


STUDENT_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
TEACHER_PROMPTS = [[14, 15, 16, 17, 18, 19, 20], [21, 22], [23, 24, 25, 26]]
COMPLETIONS = [[30, 31, 32, 33, 34, 35], [36, 37], [38, 39, 40, 41]]  # of different lengths


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("same_model", [False, True])
def test_opsd_loss_is_the_divergence_of_the_two_context_logits(tokenizer, fused, same_model):
    """opsd_loss equals divergence(completion_logits(model, student prompts), completion_logits(teacher,
    teacher prompts)), gives the student that expression's gradient, and the teacher none."""
    model = make_model("llama", tokenizer, seed=0).double()
    teacher = model if same_model else make_model("llama", tokenizer, seed=1).double()
    for beta, temperature, clip in ((0.0, 1.0, None), (0.3, 1.3, 1e-5), (1.0, 0.7, None)):  # small terms: a small clip
        student_logits, mask = completion_logits(model, STUDENT_PROMPTS, COMPLETIONS)
        with torch.no_grad():
            teacher_logits, _ = completion_logits(teacher, TEACHER_PROMPTS, COMPLETIONS)
        expected = divergence(student_logits, teacher_logits, mask, beta, temperature, clip)
        expected_grads = torch.autograd.grad(expected, list(model.parameters()))
        model.zero_grad()
        teacher.zero_grad()
        stats = {}
        loss = opsd_loss(model, teacher, STUDENT_PROMPTS, TEACHER_PROMPTS, COMPLETIONS, beta, temperature, clip,
                         fused=fused, stats=stats)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        for p, grad in zip(model.parameters(), expected_grads):
            torch.testing.assert_close(p.grad, grad, rtol=1e-8, atol=1e-12)
        assert same_model or all(p.grad is None for p in teacher.parameters())
        assert stats["divergence"] > 0 and (clip is not None) == (stats["clipped_mass"] > 0)
