"""The baselines in the same loop (SFT, GRPO), the sampled-token gradient in expectation, and compare.py."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from test_cli import run
from test_train import small_config

from data import Example
from opsd import (Config, divergence, fit_to_context, group_advantages, sampled_token_loss, token_log_probs, train,
                  weighted_nll)

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"
SPEC = importlib.util.spec_from_file_location("compare", BENCHMARK)
compare = importlib.util.module_from_spec(SPEC)  # the benchmark's runs and pairs, read by the test of its controls
SPEC.loader.exec_module(compare)


def test_grpo_advantages_on_hand_made_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    one_in_four, two_in_four = 0.5, (1 / 3) ** 0.5  # the groups' unbiased standard deviations
    expected = ([0.75 / (one_in_four + 1e-4)] + [-0.25 / (one_in_four + 1e-4)] * 3  # one right of four
                + [0.0] * 4  # all right: zero standard deviation, zero advantage, nothing learnt
                + [-0.5 / (two_in_four + 1e-4)] * 2 + [0.5 / (two_in_four + 1e-4)] * 2)
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(expected))


def test_sft_loss_is_cross_entropy_on_the_completion_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    sft = weighted_nll(token_log_probs(logits, ids), torch.ones(3, 1), mask)
    torch.testing.assert_close(sft, F.cross_entropy(logits[mask], ids[mask]))


def test_sampled_token_gradient_is_the_reverse_kl_gradient_in_expectation():
    """Exactly, summing over every token weighted by p_S; and by Monte Carlo with 20,000 samples from p_S,
    where each gradient entry is within 0.01 of the exact one (its standard error here is below 0.002)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(7, dtype=torch.float64) * 2, torch.randn(7, dtype=torch.float64) * 2
    mask = torch.ones(1, 1, dtype=torch.bool)

    def gradient(loss_of):
        z = student.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss_of(z), z)
        return grad

    reverse_kl = gradient(lambda z: divergence(z[None, None], teacher[None, None], mask, beta=1.0))
    per_token = torch.stack([gradient(lambda z: sampled_token_loss(z[None, None], teacher[None, None],
                                                                   torch.tensor([[y]]), mask)) for y in range(7)])
    p_student = student.softmax(-1)
    torch.testing.assert_close(p_student @ per_token, reverse_kl, atol=1e-12, rtol=0)
    draws = torch.multinomial(p_student, 20_000, replacement=True, generator=torch.Generator().manual_seed(1))
    monte_carlo = per_token[draws].mean(0)
    assert (monte_carlo - reverse_kl).abs().max() < 0.01


@pytest.mark.parametrize("method, group_size", [("sft", 1), ("grpo", 4)])
def test_the_baselines_train_in_the_same_loop(model_dir, tmp_path, method, group_size):
    train(small_config(model_dir, tmp_path, method=method, group_size=group_size, batch_size=2, micro_batch_size=2,
                       max_new_tokens=40))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    if method == "sft":  # the references, not samples: nothing generated, and every one right
        assert all(r["generated"] == 0 and r["rollout_acc"] == 1.0 for r in rows)
    else:
        assert all(r["generated"] > 0 and 0 <= r["zero_std_groups"] <= 1 for r in rows)


def test_sft_says_how_many_references_max_new_tokens_cuts(tokenizer, capsys):
    """SFT's completions are the references, cut at max_new_tokens: its rollout accuracy on its own references
    reads 0% when they are cut. A reference of 19 characters and its EOS fit in 20 tokens; 20 do not."""
    examples = [Example("1+1?", "x" * n, "2") for n in (19, 20, 30, 5)]
    cfg = Config(method="sft", max_new_tokens=20, batch_size=2, micro_batch_size=2)
    fit_to_context(cfg, make_model("llama", tokenizer), tokenizer, examples, examples)
    assert "warning: 2 of 4 reference solutions are cut at max_new_tokens=20" in capsys.readouterr().out


def test_compare_benchmark_runs_every_method_on_both_tasks_quickly(tmp_path):
    out = run("benchmarks/compare.py", "--quick", "--seeds", "2", "--out", str(tmp_path))
    assert "**builtin_other**" in out and "± " in out and (tmp_path / "compare.png").stat().st_size > 10_000
    points = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    assert {(p["task"], p["run"], p["seed"]) for p in points} == {
        (task, name, seed) for task in ("builtin", "builtin_other") for name in ("OPSD", "SFT", "GRPO (G=8)")
        for seed in (0, 1)}
    assert all(p["generated_tokens"] == 0 for p in points if p["run"] == "SFT")
    assert all(p["generated_tokens"] > 0 for p in points if p["run"] != "SFT" and p["step"] > 0)


def test_compare_benchmark_runs_the_tutorials_controls_and_their_differences_quickly(tmp_path):
    out = run("benchmarks/compare.py", "--quick", "--controls", "--seeds", "2", "--out", str(tmp_path))
    points = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    assert {(p["task"], p["run"]) for p in points} == {
        (task, run) for task, runs in compare.CONTROLS.items() for run in runs}
    assert {p["seed"] for p in points} == {0, 1}
    table = out.split("**The controls**")[1]
    assert all(what in table for what, _, _ in compare.PAIRS) and table.count("% ± ") == len(compare.PAIRS)


def test_compare_benchmark_runs_the_ablations_quickly(tmp_path):
    run("benchmarks/compare.py", "--quick", "--ablations", "--out", str(tmp_path))
    points = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    assert {p["task"] for p in points} == {"builtin"} and {p["run"] for p in points} == {
        "OPSD", "OPSD, forward KL", "OPSD, reverse KL", "OPSD, forward KL, clip 0.05",
        "OPSD, current weights as teacher", "OPSD, EMA teacher 0.99", "OPSD, LoRA r8, lr 1e-3",
        "OPSD, LoRA r8, lr 1e-3, forward KL, clip 0.05", "OPSD, LoRA r8, lr 1e-4",
        "OPSD, LoRA r8, lr 1e-4, forward KL, clip 0.05"}
