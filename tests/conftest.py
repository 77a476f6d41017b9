"""Tiny random models for the tests: a rotary one (Llama) and an absolute-position one (GPT-2), with the
character tokenizer of data.py. Nothing is downloaded."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from data import char_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


def make_model(kind: str, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=None)
    if kind == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **ids)
        return LlamaForCausalLM(config).eval()
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
