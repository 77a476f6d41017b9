"""sampling.py: a model, and completions sampled from it.

Owns: loading a model and its tokenizer on the best device (an opsd LoRA checkpoint as its base model plus
its adapters), the ids that end a completion, left-padding a batch of prompts, drawing one token
(temperature, top-k, top-p) and the sampling loop with a KV cache. Both the training loop (the
student's rollouts, opsd.py) and the evaluation loop (evaluate.py) sample through `sample`.
Leaves out: beam search, repetition penalties, speculative decoding, a compiled or paged cache.
Shapes: B prompts, P padded prompt length, V vocabulary.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from lora import SETTINGS, load_adapters


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_dtype(dtype: str) -> torch.dtype:
    """auto: bfloat16 on a GPU that supports it, else float32."""
    if dtype == "auto":
        return torch.bfloat16 if best_device() == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def load_model(name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """Model and tokenizer, on the best device (cuda, then mps, then cpu), in resolve_dtype(dtype). A LoRA
    checkpoint of opsd (a folder with lora.SETTINGS) loads as its base model plus its float32 adapters:
    exactly the model that trained, where merging them into bf16 weights would round most of the update away.
    A name that cannot be loaded is a ValueError that says why."""
    path = Path(name_or_path)
    if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise ValueError(f"no folder {name_or_path!r} (and it is no hub name): check the path")
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{name_or_path} holds no tokenizer: save the model's there (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if (path / SETTINGS).exists():  # the base model, then the adapters on it
            model = load_model(json.loads((path / SETTINGS).read_text())["base_model"], dtype, trust_remote_code)[0]
            load_adapters(model, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype),
                                                         trust_remote_code=trust_remote_code).to(best_device())
    except OSError as e:  # not found, or the hub out of reach
        raise ValueError(f"cannot load {name_or_path!r}: {str(e).splitlines()[0]} (offline, a hub model must "
                         "be in the local cache; or pass a local folder)") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name_or_path!r} has no eos token: rollouts could never end. Set one.")
    if tokenizer.pad_token_id is None:  # only a filler: masks come from lengths, never from the pad id
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and those of the model's generation config
    (Qwen3's lists two, <|im_end|> and <|endoftext|>)."""
    listed = getattr(model.generation_config, "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *([listed] if isinstance(listed, int) else listed or [])})


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
           top_k: int = 0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """One completion per prompt. Each ends after its first EOS (kept; eos_token_id is one id or a list of
    them, e.g. stop_ids) or at max_new_tokens."""
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    ids, attention_mask = pad_left(prompts, pad_token_id or 0, model.device)  # (B, P)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    cache = DynamicCache(config=model.config)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    stop_tensor = torch.tensor(stops, device=model.device)  # made once, not once per token
    tokens = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       logits_to_keep=1).logits[:, -1]  # (B, V)
        ids = next_token(logits, temperature, top_p, top_k, generator)[:, None]  # (B, 1)
        tokens.append(ids)
        if stops:
            finished |= torch.isin(ids[:, 0], stop_tensor)
            if finished.all():  # one host sync per token; it ends the loop as soon as every row is done
                break
        attention_mask = F.pad(attention_mask, (0, 1), value=1)
        position_ids = position_ids[:, -1:] + 1
    rows = torch.cat(tokens, 1).tolist()  # (B, new tokens); rows that finished early carry junk after EOS
    return [row[:next((i + 1 for i, token in enumerate(row) if token in stops), len(row))] for row in rows]
