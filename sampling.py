"""sampling.py: a model, and completions sampled from it.

Owns: loading a model and its tokenizer on the best device, left-padding a batch of prompts, drawing one
token (temperature, top-k, top-p) and the sampling loop with a KV cache. Both the training loop (the
student's rollouts, opsd.py) and the evaluation loop (evaluate.py) sample through `sample`.
Leaves out: beam search, repetition penalties, speculative decoding, a compiled or paged cache.
Shapes: B prompts, P padded prompt length, V vocabulary.
"""

import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


def load_model(name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """Model and tokenizer, on the best device (cuda, then mps, then cpu), in bf16 where it is supported
    unless dtype says otherwise."""
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name_or_path!r} has no eos token: rollouts could never end. Set one.")
    if tokenizer.pad_token_id is None:  # only a filler: masks come from lengths, never from the pad id
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype),
                                                 trust_remote_code=trust_remote_code)
    return model.to(device), tokenizer


def pad_left(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, P) with the pads on the left, so that every prompt ends in the last column, and the
    attention mask (B, P), 0 on the pads."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def next_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): greedy at temperature 0, else temperature, top-k and top-p
    applied in that order (as transformers does), then a draw."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth_best = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, eos_token_id: int | None = None, pad_token_id: int | None = None,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """One completion per prompt. Each ends after its first EOS (kept) or at max_new_tokens."""
    ids, attention_mask = pad_left(prompts, pad_token_id or 0, model.device)  # (B, P)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    cache = DynamicCache(config=model.config)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    tokens = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       logits_to_keep=1).logits[:, -1]  # (B, V)
        ids = next_token(logits, temperature, top_p, top_k, generator)[:, None]  # (B, 1)
        tokens.append(ids)
        if eos_token_id is not None:
            finished |= ids[:, 0] == eos_token_id
            if finished.all():  # one host sync per token; it ends the loop as soon as every row is done
                break
        attention_mask = F.pad(attention_mask, (0, 1), value=1)
        position_ids = position_ids[:, -1:] + 1
    rows = torch.cat(tokens, 1).tolist()  # (B, new tokens); rows that finished early carry junk after EOS
    return [row[:row.index(eos_token_id) + 1] if eos_token_id in row else row for row in rows]
