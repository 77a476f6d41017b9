"""Tiny random models for the tests: a rotary one (Llama), an absolute-position one (GPT-2) and a stand-in
for Qwen3 with a Qwen3-style chat template, with the character tokenizer of data.py. Nothing is downloaded."""

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import sampling
from data import char_tokenizer

if torch.cuda.is_available():  # the training tests run where load_model puts them; on a GPU, deterministically
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


def make_model(kind: str, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=None)
    if kind == "llama":  # a context of 2,048: the prompts fit by their byte count alone (data.shorten_reference),
        # so that no training test tokenizes the 20,000 built-in problems one by one (seconds each time)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, **ids)
        return LlamaForCausalLM(config).eval()
    if kind == "qwen3":
        config = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                             tie_word_embeddings=True, **ids)
        return Qwen3ForCausalLM(config).eval()
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tokenizer):
    return make_model(request.param, tokenizer)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved like any hub model, for the training and CLI tests."""
    path = tmp_path_factory.mktemp("tiny")
    make_model("llama", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Qwen3's chat template, cut down to what opsd uses: one user turn, the generation prompt, and the empty
# thinking block that enable_thinking=False adds.
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen3_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>", "<think>", "</think>"], special_tokens=True)
    tokenizer.eos_token, tokenizer.chat_template = "<|im_end|>", QWEN3_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    """A tiny random Qwen3 with a Qwen3-style chat template, saved like a hub model."""
    path = tmp_path_factory.mktemp("qwen3")
    tokenizer = qwen3_tokenizer()
    make_model("qwen3", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def compilations(monkeypatch):
    """Makes the fast path compile with a backend that counts the graphs dynamo hands it (and runs them as
    they are, so the tests need no C++ compiler); yields the count."""
    count = [0]

    def counting_backend(graph, example_inputs):
        count[0] += 1
        return graph.forward
    torch._dynamo.reset()
    monkeypatch.setattr(sampling, "BACKEND", counting_backend)
    yield count
    torch._dynamo.reset()
