"""The command line, the training loop, checkpoints and resuming, on a tiny random model."""

import json
import math
import random
import re
import shutil
from dataclasses import fields, replace

import pytest
import torch
from conftest import make_model
from data import Example
from transformers import AutoModelForCausalLM, AutoTokenizer

import opsd
from opsd import (Config, Rollouts, disable_dropout, learning_rate, load_data, logits_are_linear, opsd_loss,
                  parse_config, save_checkpoint, train, train_step, why_not_linear)
from sampling import load_model


def small_config(model_dir, out_dir, **changes) -> Config:
    settings = dict(model=str(model_dir), out_dir=str(out_dir), steps=2, batch_size=4, micro_batch_size=4,
                    max_new_tokens=6, eval_every=2, eval_size=4, save_every=1, dtype="float32")
    return Config(**{**settings, **changes})


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit:
        parse_config(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{f.name}" in text for f in fields(Config))


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--beta", "1.5"], "beta must lie in [0, 1]"),
    (["--temperature", "-1"], "temperature must be > 0"),
    (["--clip", "0"], "clip must be > 0, or none"),
    (["--batch_size", "32", "--micro_batch_size", "5"], "multiple of micro_batch_size"),
    (["--steps", "ten"], "invalid int value: 'ten'"),
    (["--off_policy", "--teacher_decay", "0"], "off_policy samples from the fixed teacher's weights"),
    (["--skip_tokens", "40"], "skip_tokens must be < max_new_tokens (no token left to train on)"),
])
def test_bad_settings_are_rejected_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_config(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_settings_parse():
    cfg = parse_config(["--clip", "none", "--beta", "0", "--no-teacher_thinking", "--steps", "7"])
    assert (cfg.clip, cfg.beta, cfg.teacher_thinking, cfg.steps) == (None, 0.0, False, 7)
    assert parse_config(["--clip", "0.05"]).clip == 0.05


def test_training_writes_checkpoints_and_resumes_exactly(model_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    evals = train(small_config(model_dir, straight, steps=3))
    assert [e["step"] for e in evals] == [0, 2, 3]
    assert (straight / "latest").read_text() == "step_3"
    assert sorted(p.name for p in straight.iterdir()) == ["curves.png", "latest", "metrics.jsonl", "step_1", "step_2",
                                                          "step_3"]
    saved = json.loads((straight / "step_3" / "opsd_config.json").read_text())
    assert saved["steps"] == 3 and saved["model"] == str(model_dir)

    interrupted = tmp_path / "interrupted"

    def save_then_crash(out, step, *args):
        save_checkpoint(out, step, *args)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(opsd, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(model_dir, interrupted, steps=3))
    monkeypatch.undo()
    assert (interrupted / "latest").read_text() == "step_2"
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_config(model_dir, interrupted, steps=3))
    with pytest.raises(ValueError, match=r"other settings: --lr \(0.001 there, 0.002 here\)"):
        train(small_config(model_dir, interrupted, steps=3, resume=True, lr=2e-3))
    with pytest.raises(ValueError, match=r"--steps \(3 there, 4 here\).*a linear decay ends at the run's own"):
        train(small_config(model_dir, interrupted, steps=4, resume=True))
    train(small_config(model_dir, interrupted, steps=3, resume=True))
    assert_same_weights(weights(interrupted / "step_3"), weights(straight / "step_3"))
    rows = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(r.keys() >= {"loss", "divergence", "clipped_mass", "rollout_acc", "length", "tokens_per_s"}
               and r["fused"] is True for r in rows if "loss" in r)
    assert not any(weights(interrupted / "step_3")[k].equal(v) for k, v in weights(model_dir).items())


def test_gradient_accumulation_equals_one_big_batch(model_dir, tmp_path, monkeypatch):
    """The loss is normalised by the completion tokens of the whole optimizer step, not per micro-batch.
    Plain SGD with lr 1 turns the weight change into the gradient itself (AdamW would amplify rounding)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    for name, micro in (("big", 4), ("small", 1)):
        train(small_config(model_dir, tmp_path / name, steps=1, micro_batch_size=micro, lr=1.0, grad_clip=1e9))
    big, small, start = (weights(p) for p in (tmp_path / "big" / "step_1", tmp_path / "small" / "step_1", model_dir))
    assert_same_weights(small, big, atol=1e-6)
    assert any((big[n] - start[n]).abs().max() > 1e-3 for n in start)


@pytest.mark.parametrize("sampled_token", [False, True])
def test_ema_teacher_moves_toward_the_student(model_dir, tmp_path, sampled_token):
    train(small_config(model_dir, tmp_path, steps=1, teacher_decay=0.25, sampled_token=sampled_token, clip=0.05))
    start, student, teacher = weights(model_dir), weights(tmp_path / "step_1"), weights(tmp_path / "step_1" / "teacher")
    for name in start:
        torch.testing.assert_close(teacher[name], 0.25 * start[name] + 0.75 * student[name], atol=1e-6, rtol=0)
    assert any(not start[n].equal(student[n]) for n in start)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_off_policy_rollouts_are_the_initial_weights_and_on_policy_ones_the_students(model_dir, tmp_path, lora_rank,
                                                                                     monkeypatch):
    """off_policy, the control: each step's rollouts are those that the initial weights write for that step's
    problems and noise (with LoRA, the base model: adapters off). On-policy, the same at step 1 and then the
    student's own, which differ once it has moved."""
    written, collect = [], opsd.collect_rollouts

    def recording(*args):
        rollouts = collect(*args)
        written.append(rollouts.completions)
        return rollouts

    monkeypatch.setattr(opsd, "collect_rollouts", recording)
    completions = {}
    for off_policy in (False, True):
        written.clear()
        cfg = small_config(model_dir, tmp_path / str(off_policy), steps=3, eval_every=3, lr=0.05, lora_rank=lora_rank,
                           lora_alpha=8.0, off_policy=off_policy, max_new_tokens=12)
        train(cfg)
        completions[off_policy] = list(written)
    initial, tokenizer = load_model(str(model_dir))
    train_set, _ = opsd.fit_to_context(cfg, initial, tokenizer, *load_data(cfg))
    expected = []
    for step in range(3):  # as train draws each step's problems and noise
        batch = random.Random(cfg.seed * 1_000_003 + step).sample(train_set, cfg.batch_size)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        expected.append(collect(initial, tokenizer, batch, cfg, generator).completions)
    assert completions[True] == expected
    assert completions[False][0] == expected[0] and completions[False][1:] != expected[1:]


def test_a_fixed_teacher_is_evaluated_once_every_other_at_each_evaluation(model_dir, tmp_path, monkeypatch):
    """Its weights never change, so its accuracy is measured at the first evaluation and reused."""
    with_reference, evaluate = [], opsd.evaluate
    monkeypatch.setattr(opsd, "evaluate",
                        lambda *a, **k: with_reference.append(k["with_reference"]) or evaluate(*a, **k))
    for changes, teacher_evaluations in ((dict(), 1), (dict(lora_rank=4), 1), (dict(teacher_decay=0.0), 3),
                                         (dict(teacher_decay=0.5), 3), (dict(method="sft"), 3)):
        with_reference.clear()
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        train(small_config(model_dir, out, steps=4, eval_every=2, save_every=4, **changes))
        assert with_reference.count(True) == teacher_evaluations and with_reference.count(False) == 3, changes
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "student_acc" in line]
        assert len(evals) == 3 and all("teacher_acc" in e for e in evals)


def test_prompts_that_do_not_fit_the_context_are_skipped_or_refused(model_dir, tmp_path, capsys):
    short = AutoModelForCausalLM.from_pretrained(model_dir)
    short.config.max_position_embeddings = 118  # teacher prompts are 85-105 tokens long, rollouts up to 20
    short.save_pretrained(tmp_path / "short")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "short")
    train(small_config(tmp_path / "short", tmp_path / "run", max_new_tokens=20))
    assert re.search(r"warning: 0 of 20000 examples had their reference solution shortened and [1-9]\d* were "
                     r"skipped to fit their prompts in 98 tokens", capsys.readouterr().out)
    with pytest.raises(ValueError, match=r"0 training and 0 held-out problems fit in 28 prompt tokens"):
        train(small_config(tmp_path / "short", tmp_path / "run2", max_new_tokens=90))
    with pytest.raises(ValueError, match=r"max_new_tokens=118 leaves no room for a prompt in the model's context"):
        train(small_config(tmp_path / "short", tmp_path / "run3", max_new_tokens=118))


def test_fused_and_plain_training_take_the_same_step(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    for name, fused in (("fused", True), ("plain", False)):
        train(small_config(model_dir, tmp_path / name, steps=1, fused=fused, beta=0.3, clip=0.05, lr=1.0,
                           grad_clip=1e9, micro_batch_size=2))
    assert_same_weights(weights(tmp_path / "fused" / "step_1"), weights(tmp_path / "plain" / "step_1"), atol=1e-5)


def test_the_fused_path_is_used_only_where_logits_are_hidden_times_the_head(tokenizer):
    assert logits_are_linear(make_model("llama", tokenizer)) and logits_are_linear(make_model("gpt2", tokenizer))
    biased = make_model("llama", tokenizer)
    biased.lm_head = torch.nn.Linear(32, len(tokenizer), bias=True)
    assert not logits_are_linear(biased) and why_not_linear(biased) == "its LM head has a bias"
    scaled = make_model("llama", tokenizer)
    scaled.lm_head.forward = lambda h: torch.nn.functional.linear(h, scaled.lm_head.weight) * 0.5  # a logit scale
    assert not logits_are_linear(scaled) and why_not_linear(scaled) == "its forward rescales them"


def test_one_train_step_is_opsd_loss_backward_and_an_optimizer_step(tokenizer):
    """Micro-batches of one rollout each, of different lengths, weighted by their share of the step's tokens,
    make the step of the whole batch's loss. SGD with lr 0.5 makes the weight change -0.5 x the gradient."""
    model, teacher = make_model("llama", tokenizer, seed=0).double(), make_model("llama", tokenizer, seed=1).double()
    prompts, teacher_prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]], [[14, 15, 16], [21, 22], [23, 24, 25, 26]]
    completions = [[30, 31, 32, 33, 34, 35], [36, 37], [38, 39, 40, 41]]
    loss = opsd_loss(model, teacher, prompts, teacher_prompts, completions, beta=0.3)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    rollouts = Rollouts(prompts, teacher_prompts, completions, rewards=torch.tensor([1.0, 0.0, 0.0]),
                        truncated=torch.tensor([True, False, False]))
    cfg = Config(batch_size=3, micro_batch_size=1, beta=0.3, grad_clip=1e9)
    stats = train_step(model, teacher, torch.optim.SGD(model.parameters(), lr=1.0), rollouts, cfg, 0.5, fused=True)
    for p, start, grad in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), start - 0.5 * grad, rtol=1e-8, atol=1e-12)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert (stats["length"], stats["tokens"], stats["rollout_acc"]) == (4, 12, pytest.approx(1 / 3))
    assert stats["truncated"] == pytest.approx(1 / 3) and stats["entropy"] > 0


def test_every_checkpoint_is_kept_and_loads_unless_keep_last_says_otherwise(model_dir, tmp_path):
    train(small_config(model_dir, tmp_path / "all", steps=2))
    for step in (1, 2):
        model, _ = load_model(str(tmp_path / "all" / f"step_{step}"))
        assert not any(torch.equal(p, q) for p, q in zip(model.state_dict().values(), weights(model_dir).values()))
    assert not (tmp_path / "all" / "step_1" / "state.pt").exists()  # only the newest is resumed from
    last = tmp_path / "last"
    train(small_config(model_dir, last, steps=3, keep_last=2, lr_schedule="constant"))
    assert sorted(p.name for p in last.glob("step_*")) == ["step_2", "step_3"]
    shutil.copytree(last / "step_3", last / "step_9")  # a leftover of a later run: never makes `latest` vanish
    train(small_config(model_dir, last, steps=5, keep_last=1, resume=True, lr_schedule="constant"))
    assert (last / "latest").read_text() == "step_5"
    assert sorted(p.name for p in last.glob("step_*")) == ["step_5", "step_9"]


def test_the_learning_rate_is_constant_or_decays_linearly():
    assert [learning_rate(Config(lr=1.0, steps=4), s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [learning_rate(Config(lr=1.0, steps=4, lr_schedule="constant"), s) for s in range(4)] == [1.0] * 4


def test_dropout_is_off_for_good_in_train_mode(tokenizer):
    gpt2 = make_model("gpt2", tokenizer)  # dropout 0.1 in embeddings, attention and residuals
    gpt2.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert not torch.equal(gpt2(ids).logits, gpt2(ids).logits)
    disable_dropout(gpt2)
    assert torch.equal(gpt2(ids).logits, gpt2.eval()(ids).logits)


def test_the_baselines_losses_turn_dropout_off_themselves(tokenizer):
    """The Python API: a model straight from its config has dropout on (GPT-2: 0.1); two calls must agree."""
    from opsd import grpo_loss, sft_loss
    for loss in (lambda m: sft_loss(m, [[5, 6]], [[7, 8, 9]]),
                 lambda m: grpo_loss(m, [[5, 6]], [[7, 8]], torch.ones(1))):
        gpt2 = make_model("gpt2", tokenizer).train()
        assert loss(gpt2).item() == loss(gpt2).item()


def test_the_linear_head_check_holds_in_bf16(tokenizer):
    from conftest import qwen3_tokenizer
    model = make_model("qwen3", qwen3_tokenizer()).to(torch.bfloat16)
    assert logits_are_linear(model)
    model.lm_head.forward = lambda h: torch.nn.functional.linear(h, model.lm_head.weight) * 0.9  # a logit scale
    assert not logits_are_linear(model)
    capped = make_model("qwen3", qwen3_tokenizer())
    capped.config.final_logit_softcapping = 30.0  # Gemma-2's: invisible on small logits, so the config is asked
    assert not logits_are_linear(capped)


def bf16_step(model_dir, out_dir, dtype, monkeypatch, **changes):
    """One step at lr 5e-6; asserts that the step's matmuls ran in bf16 exactly when dtype is bfloat16."""
    def spy(*args, **kwargs):
        assert torch.is_autocast_enabled("cpu") == (dtype == "bfloat16")
        return train_step(*args, **kwargs)

    monkeypatch.setattr(opsd, "train_step", spy)
    train(small_config(model_dir, out_dir, steps=1, lr=5e-6, dtype=dtype, **changes))
    return weights(out_dir / "step_1")


def test_full_fine_tuning_in_bf16_keeps_float32_master_weights(model_dir, tmp_path, monkeypatch):
    """At lr 5e-6 most AdamW steps are below half a bf16 spacing: bf16 weights would keep under a fifth of
    them (measured: 11-17%). The float32 master weights take every step, and the step of a float32 run to
    within the noise of bf16 matmuls (measured: the same sign in over 99% of entries)."""
    start = weights(model_dir)
    mixed = bf16_step(model_dir, tmp_path / "bf16", "bfloat16", monkeypatch)
    exact = bf16_step(model_dir, tmp_path / "f32", "float32", monkeypatch)
    assert all(w.dtype == torch.float32 for w in mixed.values())
    before, moved, update = (torch.cat([w.flatten() for w in ws.values()]) for ws in (start, mixed, exact))
    moved, update = moved - before, update - before
    assert (moved != 0).float().mean() > 0.99
    assert (moved.sign() == update.sign()).float().mean() > 0.97 and (moved - update).norm() < 0.25 * update.norm()
    assert (before.bfloat16() != (before + update).bfloat16()).float().mean() < 0.3  # what bf16 weights keep


def test_an_ema_teacher_in_bf16_moves_where_a_bf16_lerp_would_not(model_dir, tmp_path, monkeypatch):
    start = weights(model_dir)
    student = bf16_step(model_dir, tmp_path, "bfloat16", monkeypatch, teacher_decay=0.9)
    teacher = weights(tmp_path / "step_1" / "teacher")
    for name in start:
        torch.testing.assert_close(teacher[name], 0.9 * start[name] + 0.1 * student[name], atol=1e-9, rtol=1e-6)
        assert (teacher[name] != start[name]).float().mean() > 0.95, name
        bf16_lerp = start[name].bfloat16().lerp(student[name].bfloat16(), 0.1)
        assert (bf16_lerp != start[name].bfloat16()).float().mean() < 0.1, name


@pytest.mark.parametrize("changes", [dict(dtype="bfloat16"), dict(teacher_decay=0.5)])
def test_bf16_and_ema_runs_resume_exactly(model_dir, tmp_path, monkeypatch, changes):
    settings = dict(steps=2, lr_schedule="constant", **changes)
    train(small_config(model_dir, tmp_path / "straight", **settings))
    train(small_config(model_dir, tmp_path / "resumed", **{**settings, "steps": 1}))
    train(small_config(model_dir, tmp_path / "resumed", resume=True, **settings))
    for folder in ("step_2", "step_2/teacher") if "teacher_decay" in changes else ("step_2",):
        assert_same_weights(weights(tmp_path / "resumed" / folder), weights(tmp_path / "straight" / folder))


def test_fast_sampling_runs_through_training_and_evaluation(model_dir, tmp_path, compilations):
    """With LoRA in bf16: the decode step compiles under autocast, with the adapters on and off."""
    train(small_config(model_dir, tmp_path, fast_sampling=True, lora_rank=4, dtype="bfloat16"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert compilations[0] >= 1
    assert all(row["generated"] > 0 and row["loss"] == row["loss"] for row in rows if "loss" in row)


def test_a_non_finite_gradient_norm_stops_before_the_step_and_nothing_is_written_after(model_dir, tmp_path,
                                                                                       monkeypatch):
    """Step 2's gradient turns NaN (the loss stays finite, as at --lr 1e4 --beta 0): no optimizer step, no row,
    no checkpoint, the one-line error; step 1's checkpoint and rows stay as they were."""
    build_models = opsd.build_models

    def poisoned(cfg, checkpoint):
        built, backwards = build_models(cfg, checkpoint), []
        poison = lambda g: g * math.nan if len(backwards) == 1 else backwards.append(g)  # noqa: E731 NaN at step 2
        next(built[0].parameters()).register_hook(poison)
        return built

    monkeypatch.setattr(opsd, "build_models", poisoned)
    with pytest.raises(FloatingPointError, match=r"^the grad_norm is nan: lower --lr or check the data \(no step was"):
        train(small_config(model_dir, tmp_path, steps=3))
    text = (tmp_path / "metrics.jsonl").read_text()
    assert [r["step"] for r in map(json.loads, text.splitlines())] == [0, 1] and "NaN" not in text
    assert (tmp_path / "latest").read_text() == "step_1" and not (tmp_path / "step_2").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused_at_start(model_dir, tmp_path, tokenizer):
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(folder)
    bigger = AutoTokenizer.from_pretrained(model_dir)
    bigger.add_tokens(["<|im_start|>"], special_tokens=True)  # as a chat template's tokens are added
    bigger.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"has {len(tokenizer) + 1} tokens, the model's embedding {len(tokenizer)}: "
                                         r"resize it"):
        train(small_config(folder, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="resize it"):  # evaluate.py loads through the same function
        load_model(str(folder))


def test_resume_without_a_checkpoint_is_an_error(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint to continue: leave --resume out"):
        train(small_config(model_dir, tmp_path / "empty", resume=True))


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_evaluation_data_set_has_columns_of_its_own_and_eval_size_is_named_when_it_takes_all(model_dir,
                                                                                                 tmp_path):
    """GSM8K-style training (the solution under 'answer') with an evaluation set in MATH-style columns."""
    train_file = write_rows(tmp_path / "train.jsonl", [{"q": f"{i}+1?", "answer": f"so\n#### {i + 1}"}
                                                       for i in range(6)])
    test_file = write_rows(tmp_path / "test.jsonl", [{"problem": "2+2?", "solution": "\\boxed{4}"}])
    cfg = small_config(model_dir, tmp_path, dataset=train_file, question_column="q", solution_column="answer",
                       eval_dataset=test_file, eval_columns="problem")
    train_set, test_set = load_data(cfg)
    assert len(train_set) == 6 and train_set[0].answer == "1" and test_set[0].question == "2+2?"
    assert test_set[0].answer == "4"
    with pytest.raises(ValueError, match=r"has 6 problems: eval_size=4 held out leave fewer than batch_size=4 to "
                                         r"train on. Lower --eval_size or pass --eval_dataset"):
        load_data(small_config(model_dir, tmp_path, dataset=train_file, question_column="q", solution_column="answer"))


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_tokens_carry_no_loss_and_no_gradient_and_the_rest_is_unchanged(tokenizer, fused):
    """--skip_tokens k: the first k completion tokens join both prompts, so nothing predicts them in the loss;
    the loss is the divergence at the other tokens alone, as a mask that leaves out the first k would give."""
    model, teacher = make_model("llama", tokenizer, seed=0).double(), make_model("llama", tokenizer, seed=1).double()
    problems = [Example("ann has 12 pens, gets 30 more. how many pens now?", "12+30=42. \\boxed{42}", "42")] * 3
    cfg = Config(max_new_tokens=8, skip_tokens=3, temperature=1.0)
    skipped = opsd.collect_rollouts(model, tokenizer, problems, cfg, torch.Generator().manual_seed(0))
    whole = opsd.collect_rollouts(model, tokenizer, problems, replace(cfg, skip_tokens=0),
                                  torch.Generator().manual_seed(0))
    assert [w[3:] for w in whole.completions] == skipped.completions and len(whole.completions[0]) == 8
    loss = opsd_loss(model, teacher, skipped.student_prompts, skipped.teacher_prompts, skipped.completions,
                     beta=0.3, fused=fused)
    student, mask = opsd.completion_logits(model, whole.student_prompts, whole.completions)
    with torch.no_grad():
        target, _ = opsd.completion_logits(teacher, whole.teacher_prompts, whole.completions)
    mask[:, :3] = False  # the first three tokens: no loss
    expected = opsd.divergence(student, target, mask, beta=0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())),
                    torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_a_run_logs_the_cut_rollouts_and_the_students_entropy(model_dir, tmp_path):
    train(small_config(model_dir, tmp_path / "run", steps=1))
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    assert row["truncated"] == 1.0 and 0 < row["entropy"] < math.log(len(AutoTokenizer.from_pretrained(model_dir)))


def test_resume_from_a_damaged_checkpoint_says_so_in_one_line(model_dir, tmp_path):
    train(small_config(model_dir, tmp_path / "run", steps=1))
    weights = tmp_path / "run" / "step_1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk
    with pytest.raises(ValueError, match=r"step_1 is damaged \(.*\), and only the newest checkpoint keeps the "
                                         r"optimizer state: start a new run"):
        train(small_config(model_dir, tmp_path / "run", steps=2, resume=True))


def test_the_prompt_limit_defaults_to_the_models_context(model_dir, tmp_path, capsys):
    wide = AutoModelForCausalLM.from_pretrained(model_dir)
    wide.config.max_position_embeddings = 4096
    wide.save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "wide")
    long = tmp_path / "long.jsonl"  # references of 3,000 tokens (one a character)
    write_rows(long, [{"question": f"{i}+1?", "solution": "1 " * 1500 + f"so \\boxed{{{i + 1}}}"} for i in range(8)])
    settings = dict(dataset=str(long), eval_size=4, steps=1)
    train(small_config(tmp_path / "wide", tmp_path / "run", **settings))
    assert "shortened" not in capsys.readouterr().out  # kept whole: the limit is 4,096 - max_new_tokens
    train(small_config(tmp_path / "wide", tmp_path / "run2", max_prompt_tokens=2048, **settings))
    assert "4 of 4 examples had their reference solution shortened" in capsys.readouterr().out
