"""Whatever causal LM a user brings: sixteen architectures, built tiny from their configs (random weights, the
character tokenizer of data.py, nothing downloaded), each checked for what OPSD relies on: dropout off, so that
the same context gives a loss of exactly 0; LoRA on every projection; the fused divergence equal to the plain
one where the head is linear; greedy `sample` equal to `generate`; and a few steps through `train`."""

import copy
import json

import pytest
import torch
import transformers as T
from test_train import small_config

import opsd
from data import builtin_examples, student_prompt
from lora import LINEAR, LoRALinear, add_lora
from opsd import disable_dropout, logits_are_linear, opsd_loss, train
from sampling import sample

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024)
NO_GQA = {**SMALL, "num_key_value_heads": 4}
# name -> (config class, model class, config settings, the projections LoRA must cover)
LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
NEOX_LIKE = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
ARCHITECTURES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, SMALL, LLAMA_LIKE),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, SMALL, LLAMA_LIKE),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {**SMALL, "head_dim": 8}, LLAMA_LIKE),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, {**SMALL, "head_dim": 8, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 32}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {**SMALL, "sliding_window": 64}, LLAMA_LIKE),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**SMALL, "head_dim": 8, "sliding_window": 64}, LLAMA_LIKE),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {**SMALL, "head_dim": 8, "sliding_window": 64}, LLAMA_LIKE),
    "phi": (T.PhiConfig, T.PhiForCausalLM, {**NO_GQA, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attention_dropout": 0.1},
            {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {**SMALL, "resid_pdrop": 0.1, "attention_dropout": 0.1},
             {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=1024),  # dropout 0.1
             {"c_attn", "c_proj", "c_fc"}),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {**NO_GQA, "hidden_dropout": 0.1, "attention_dropout": 0.1},
                 NEOX_LIKE),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, SMALL, LLAMA_LIKE),
    "cohere": (T.CohereConfig, T.CohereForCausalLM, SMALL, LLAMA_LIKE),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, {**SMALL, "attention_dropout": 0.1, "logits_scaling": 8.0},
                LLAMA_LIKE),
    "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.1,
              attention_dropout=0.1), NEOX_LIKE),
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=1024, word_embed_proj_dim=32, layerdrop=0.1),  # and its float dropout 0.1
            {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
}
NOT_LINEAR = {"gemma2": "final_logit_softcapping = 30.0", "cohere": "logit_scale = 0.0625",  # the plain path, why
              "granite": "logits_scaling = 8.0", "phi": "its LM head has a bias"}
PROMPTS, TEACHER_PROMPTS = [[5, 9, 17, 40], [33, 2, 60, 61, 62, 70], [44]], [[7, 8], [50, 51, 52], [20, 21, 22, 23]]
COMPLETIONS = [[30, 31, 32, 33, 34], [36, 37], [38, 39, 40]]


def tiny(name, tokenizer, seed=0):
    config_class, model_class, settings, _ = ARCHITECTURES[name]
    torch.manual_seed(seed)
    config = config_class(**settings, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return model_class(config)  # in train mode, dropout on, as from_pretrained's model would be after .train()


@pytest.fixture(params=ARCHITECTURES)
def name(request):
    return request.param


def test_the_tiny_models_are_the_named_architectures_and_tiny(name, tokenizer):
    model = tiny(name, tokenizer).eval()
    assert model.config.model_type == name.replace("gemma3", "gemma3_text")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert logits_are_linear(model) == (name not in NOT_LINEAR)


def test_the_api_turns_dropout_off_so_the_same_context_gives_exactly_zero(name, tokenizer):
    """opsd_loss on a fresh model (train mode, dropout as configured), a frozen copy as teacher, the student's
    prompts in both contexts: the divergence is exactly 0, and every dropout probability is 0 afterwards."""
    model = tiny(name, tokenizer)
    teacher = copy.deepcopy(model)
    for fused in (True, False) if name not in NOT_LINEAR else (False,):
        assert opsd_loss(model, teacher, PROMPTS, PROMPTS, COMPLETIONS, beta=0.0, fused=fused).item() == 0.0
    for owner in [*model.modules(), model.config]:
        assert all(v == 0 for k, v in vars(owner).items() if isinstance(v, float) and "drop" in k), owner
        assert not isinstance(owner, torch.nn.Dropout) or owner.p == 0


def test_fused_equals_plain_where_the_head_is_linear(name, tokenizer):
    if name in NOT_LINEAR:
        pytest.skip("the logits are not hidden @ W.T: train takes the plain path")
    model, teacher = disable_dropout(tiny(name, tokenizer)), tiny(name, tokenizer, seed=1).eval()
    values, grads = [], []
    for fused in (True, False):
        loss = opsd_loss(model, teacher, PROMPTS, TEACHER_PROMPTS, COMPLETIONS, beta=0.3, clip=0.05, fused=fused)
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    assert values[0] > 0 and values[0] == pytest.approx(values[1], rel=1e-5)
    for fused, plain in zip(*grads):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-4)


def test_default_lora_covers_every_projection(name, tokenizer, capsys):
    model = tiny(name, tokenizer)
    add_lora(model, 4, 8, ["all"])
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == ARCHITECTURES[name][3]
    bare = [n for n, m in model.named_modules() if isinstance(m, LINEAR) and not n.endswith(".base")]
    assert bare == ["lm_head"]  # every other linear layer has its adapter
    warning = capsys.readouterr().out
    if name == "qwen3_moe":  # its experts are (experts, out, in) tensors and its router a bare weight
        assert "6 weights" in warning and "experts.down_proj, experts.gate_up_proj, gate.weight" in warning
    else:
        assert warning == ""


def test_greedy_sample_equals_generate(name, tokenizer):
    model = tiny(name, tokenizer).eval()
    prompts, eos = [[5, 9, 17, 40], [33, 2, 60, 61, 62, 70, 80], [44]], tokenizer.eos_token_id
    got = sample(model, prompts, 8, temperature=0, eos_token_id=eos, pad_token_id=0)
    for prompt, row in zip(prompts, got):
        ids = torch.tensor([prompt])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
        assert row == expected


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_a_few_steps_of_opsd_through_train(name, lora, tokenizer, tmp_path, monkeypatch, capsys):
    """The student's prompt in both contexts and the frozen teacher: step 0's loss is exactly 0 (dropout is
    off in the model train loads). With LoRA the start line names every projection. (A few problems, and no
    evaluation, which test_greedy_sample_equals_generate covers: a second each.)"""
    folder = tmp_path / "model"
    tiny(name, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(opsd, "teacher_prompt", lambda example, tokenizer, thinking: student_prompt(example, tokenizer))
    monkeypatch.setattr(opsd, "load_data", lambda cfg: (builtin_examples("train", 8), builtin_examples("test", 1)))
    monkeypatch.setattr(opsd, "evaluate_both", lambda *args: {"student_acc": 0.0, "teacher_acc": 0.0})
    train(small_config(folder, tmp_path / "run", beta=0.0, save_every=2, lora_rank=4 if lora else 0, lora_alpha=8))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps[0]["loss"] == 0.0 and len(steps) == 2 and steps[0]["fused"] == (name not in NOT_LINEAR)
    out = capsys.readouterr().out
    plain = f"the divergence takes the plain path: this model's logits are not hidden @ W.T ({NOT_LINEAR.get(name)})"
    assert plain in out if name in NOT_LINEAR else "the divergence takes the fused path\n" in out
    if lora:
        assert f"({', '.join(sorted(ARCHITECTURES[name][3]))}): " in out and " trainable parameters" in out
