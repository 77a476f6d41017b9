"""LoRA and a real-model layout: a tiny random Qwen3 with a Qwen3-style chat template, trained with adapters
and the fixed teacher (the same network, adapters off)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, qwen3_tokenizer
from test_train import small_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import opsd
from lora import CONFIG, WEIGHTS, LoRALinear, adapters_off, add_lora, load_adapters, lora_layers, save_adapters
from opsd import parse_config, save_checkpoint, train
from sampling import load_model

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[5, 17, 30, 41, 9, 77, 3, 12]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS.to(model.device)).logits.cpu()


def lora_model(seed=0):
    model = make_model("qwen3", qwen3_tokenizer(), seed)
    add_lora(model, rank=4, alpha=8, targets=TARGETS)
    return model


def test_adapters_start_at_zero_so_step_0_is_the_base_model():
    base, model = make_model("qwen3", qwen3_tokenizer()), lora_model()
    assert len(lora_layers(model)) == 2 * len(TARGETS)
    assert torch.equal(logits(model), logits(base))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)


def test_adapters_off_nests_and_restores_what_was_there():
    model = lora_model()
    state = lambda: {layer.enabled for layer in lora_layers(model)}
    with adapters_off(model):
        with adapters_off(model, False):  # leaves them as they are: off
            assert state() == {False}
        with adapters_off(model):
            assert state() == {False}
        assert state() == {False}  # the inner blocks did not switch them back on
    assert state() == {True}


def test_only_adapter_parameters_get_gradients():
    model = lora_model()
    for layer in lora_layers(model):  # B starts at zero, which gives A a zero gradient: move B first
        torch.nn.init.normal_(layer.lora_B)
    model(input_ids=IDS).logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_unknown_target_names_are_an_error_that_lists_the_real_ones():
    """Also when some names match: GPT-2 has c_attn but no q_proj, so its adapters would silently miss it."""
    with pytest.raises(ValueError, match=r"no linear layer is named \['qkv'\]; this model's are \['down_proj', "
                                         r"'gate_proj', 'k_proj', 'o_proj'.*set --lora_targets"):
        add_lora(make_model("qwen3", qwen3_tokenizer()), 4, 8, ["qkv"])
    with pytest.raises(ValueError, match=r"named \['q_proj'\]; this model's are \['c_attn', 'c_fc', 'c_proj'\]"):
        add_lora(make_model("gpt2", qwen3_tokenizer()), 4, 8, ["c_attn", "q_proj"])


def test_gpt2_conv1d_layers_take_adapters_that_merge_exactly():
    """GPT-2's Conv1D stores its weight as (in, out): the adapter and its merge must follow."""
    base, model = make_model("gpt2", qwen3_tokenizer()), make_model("gpt2", qwen3_tokenizer())
    add_lora(model, 4, 8, ["all"])
    assert len(lora_layers(model)) == 8 and torch.equal(logits(model), logits(base))
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    for name, m in base.named_modules():
        if isinstance(model.get_submodule(name), LoRALinear):
            m.weight.data = model.get_submodule(name).merged_weight()
    assert not torch.allclose(logits(model), logits(make_model("gpt2", qwen3_tokenizer())), atol=1e-3)
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=1e-5)


def test_an_ema_teacher_with_lora_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--lora_rank", "4", "--teacher_decay", "0.5"])
    assert "an EMA needs weights of its own" in capsys.readouterr().err


def test_trained_adapters_merge_reload_and_switch_off_to_the_base(qwen3_dir, tmp_path):
    run = tmp_path / "run"
    train(small_config(qwen3_dir, run, lora_rank=4, lora_alpha=8, lr=1e-2, max_new_tokens=8, steps=3, save_merged=True))
    checkpoint = run / "step_3"
    base = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    load_adapters(model, checkpoint)
    assert len(lora_layers(model)) == 2 * len(TARGETS)
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model))  # they trained
    with adapters_off(model):
        assert torch.equal(logits(model), logits(base))  # the fixed teacher is exactly the base model
    trained = logits(model)
    assert not torch.allclose(trained, logits(base), atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / "merged")  # a plain model: no opsd needed to load it
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=1e-5)
    loaded, _ = load_model(str(checkpoint))  # as evaluate.py loads it: the base plus the adapters
    assert torch.equal(logits(loaded), trained)


def test_lora_training_resumes_exactly_and_fused_equals_plain(qwen3_dir, tmp_path, monkeypatch):
    lora = dict(lora_rank=4, lora_alpha=8, max_new_tokens=8, lr_schedule="constant")  # --steps may change
    train(small_config(qwen3_dir, tmp_path / "straight", steps=2, **lora))
    train(small_config(qwen3_dir, tmp_path / "resumed", steps=1, **lora))
    train(small_config(qwen3_dir, tmp_path / "resumed", steps=2, resume=True, **lora))
    straight, resumed = (load_file(tmp_path / name / "step_2" / WEIGHTS) for name in ("straight", "resumed"))
    assert not (tmp_path / "straight" / "step_2" / "merged").exists()  # adapters alone
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name

    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    for name, fused in (("fused", True), ("plain", False)):
        train(small_config(qwen3_dir, tmp_path / name, steps=1, fused=fused, lr=1.0, grad_clip=1e9, **lora))
    fused, plain = (load_file(tmp_path / name / "step_1" / WEIGHTS) for name in ("fused", "plain"))
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], atol=1e-5, rtol=0)


def test_the_fixed_teacher_is_the_student_network_with_adapters_off(qwen3_dir, tmp_path, monkeypatch):
    """No second copy of the weights: every teacher forward runs on the student's own modules."""
    seen = []
    original = opsd.completion_hidden

    def spy(model, prompts, completions):
        seen.append((id(model), tuple(layer.enabled for layer in lora_layers(model))))
        return original(model, prompts, completions)

    monkeypatch.setattr(opsd, "completion_hidden", spy)
    train(small_config(qwen3_dir, tmp_path / "run", steps=1, lora_rank=4, lora_alpha=8, max_new_tokens=8))
    assert len({model for model, _ in seen}) == 1
    assert [all(enabled) for _, enabled in seen] == [False, True]  # teacher (adapters off), then student


def test_cli_trains_the_qwen3_stand_in_with_lora_and_gradient_checkpointing(qwen3_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "opsd.py", "--model", str(qwen3_dir), "--out_dir", str(tmp_path / "run"), "--steps", "2",
         "--batch_size", "4", "--micro_batch_size", "2", "--max_new_tokens", "8", "--eval_size", "4",
         "--lora_rank", "4", "--lora_alpha", "8", "--gradient_checkpointing", "--max_prompt_tokens", "115"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out problems (teacher with reference" in done.stdout.strip().splitlines()[-2]  # then the curves
    assert "were skipped to fit their prompts in 115 tokens" in done.stdout  # teacher prompts: 106-124
    checkpoint = tmp_path / "run" / "step_2"
    assert (checkpoint / WEIGHTS).exists() and not (checkpoint / "merged").exists()
    assert "the divergence takes the fused path" in done.stdout
    assert ("LoRA on 14 layers (down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj): 4,096 "
            in done.stdout and "trainable parameters" in done.stdout)
    assert load_model(str(checkpoint))[0].config.model_type == "qwen3"


def test_a_bf16_lora_checkpoint_loads_as_the_model_that_trained(qwen3_dir, tmp_path, monkeypatch):
    """bf16 base, lr 5e-6: the update is far below one bf16 step of the weights. The checkpoint, loaded as
    evaluate.py loads it, gives the in-memory adapter model's logits exactly; merged into bf16 weights (what
    opsd did before), the adapters move the logits away from them by over half the update's own effect."""
    in_memory = {}

    def save_and_remember(out, step, model, *args):
        in_memory["logits"] = logits(model).float()
        with adapters_off(model):
            in_memory["base"] = logits(model).float()
        in_memory["merged"] = {n: m.merged_weight() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        save_checkpoint(out, step, model, *args)

    monkeypatch.setattr(opsd, "save_checkpoint", save_and_remember)
    train(small_config(qwen3_dir, tmp_path / "run", lora_rank=4, lora_alpha=8, lr=5e-6, steps=3, dtype="bfloat16",
                       save_merged=True, max_new_tokens=8))
    effect = (in_memory["logits"] - in_memory["base"]).abs().mean()  # the update's own effect on the logits
    loaded, _ = load_model(str(tmp_path / "run" / "step_3"), dtype="bfloat16")
    assert effect > 0 and torch.equal(logits(loaded).float(), in_memory["logits"])  # the very same model
    bf16_merge = load_model(str(qwen3_dir), dtype="bfloat16")[0]
    for name, m in bf16_merge.named_modules():
        if name in in_memory["merged"]:
            m.weight.data = in_memory["merged"][name].to(torch.bfloat16)
    assert (logits(bf16_merge).float() - in_memory["logits"]).abs().mean() > 0.5 * effect  # the test can fail
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "step_3" / "merged")  # the float32 export
    assert merged.dtype == torch.float32
    for name, weight in in_memory["merged"].items():
        assert torch.equal(merged.get_submodule(name).weight, weight), name


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])  # GPT-2: Conv1D layers, which peft takes as fan_in_fan_out
def test_peft_loads_the_adapters_as_opsd_does(kind, tmp_path):
    peft = pytest.importorskip("peft", reason="pip install peft to check the adapters' format against peft")
    tokenizer = qwen3_tokenizer()
    base, model = make_model(kind, tokenizer), make_model(kind, tokenizer)
    add_lora(model, rank=4, alpha=8, targets=["all"])
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B)  # trained adapters: not zero
    save_adapters(model, tmp_path, "base", rank=4, alpha=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]
    via_peft = peft.PeftModel.from_pretrained(base, tmp_path)
    assert not torch.allclose(logits(via_peft), logits(make_model(kind, tokenizer)), atol=1e-3)
    torch.testing.assert_close(logits(via_peft), logits(model), atol=1e-6, rtol=1e-6)
    reloaded = make_model(kind, tokenizer)
    load_adapters(reloaded, tmp_path)
    assert torch.equal(logits(reloaded), logits(model))


def test_adapters_that_peft_saved_load_as_peft_runs_them(tmp_path):
    peft = pytest.importorskip("peft", reason="pip install peft to check the adapters' format against peft")
    via_peft = peft.get_peft_model(make_model("qwen3", qwen3_tokenizer()), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    for name, p in via_peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    via_peft.save_pretrained(tmp_path)  # every field of peft's config, most at their defaults
    model = make_model("qwen3", qwen3_tokenizer())
    load_adapters(model, tmp_path)
    assert len(lora_layers(model)) == 4 and not torch.allclose(logits(model), logits(lora_model()), atol=1e-3)
    torch.testing.assert_close(logits(model), logits(via_peft), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("setting", [{"use_dora": True}, {"init_lora_weights": "pissa"},
                                     {"alora_invocation_tokens": [5, 6]}])
def test_adapters_that_are_not_plain_lora_are_refused(setting, tmp_path):
    model = lora_model()
    save_adapters(model, tmp_path, "base", rank=4, alpha=8)
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps(config | setting))
    with pytest.raises(ValueError, match=rf"not plain LoRA \(\['{next(iter(setting))}'\]\): use peft"):
        load_adapters(make_model("qwen3", qwen3_tokenizer()), tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps(config))
    state = load_file(tmp_path / WEIGHTS)
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, tmp_path / WEIGHTS)  # one layer's alone
    with pytest.raises(ValueError, match="do not fit this model"):
        load_adapters(make_model("qwen3", qwen3_tokenizer()), tmp_path)
