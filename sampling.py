"""sampling.py: a model, and completions sampled from it.

Owns: loading a model on the best device (an opsd LoRA checkpoint as its base model plus adapters), the ids that end
a completion, left padding, drawing one token (temperature, top-k, top-p) and `sample`, the loop with a KV cache that
opsd.py's rollouts and evaluate.py use: plain (the reference) or fast (a static cache, a compiled step: for GPUs).
Leaves out: beam search, repetition penalties, speculative decoding, a paged cache.
Shapes: B prompts, P padded prompt length, V vocabulary.
"""

import contextlib
import functools
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lora import CONFIG, load_adapters


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if best_device() == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def load_model(name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """Model and tokenizer on best_device(), in resolve_dtype(dtype), or a ValueError that says why. A LoRA
    checkpoint (a folder with PEFT's adapter_config.json) is its base model plus its float32 adapters."""
    path = Path(name_or_path)
    if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise ValueError(f"no folder {name_or_path!r} (and it is no hub name): check the path")
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{name_or_path} holds no tokenizer: save the model's there (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if (path / CONFIG).exists():  # the base model, then the adapters on it
            base = json.loads((path / CONFIG).read_text())["base_model_name_or_path"]
            model = load_model(base, dtype, trust_remote_code)[0]
            load_adapters(model, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype),
                                                         trust_remote_code=trust_remote_code).to(best_device())
    except OSError as e:  # not found, or the hub out of reach
        raise ValueError(f"cannot load {name_or_path!r}: {str(e).splitlines()[0]} (offline, a hub model must "
                         "be in the local cache; or pass a local folder)") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name_or_path!r} has no eos token: rollouts could never end. Set one.")
    if len(tokenizer) > (rows := model.get_input_embeddings().num_embeddings):  # else an IndexError mid-run
        raise ValueError(f"the tokenizer of {name_or_path!r} has {len(tokenizer)} tokens, the model's embedding "
                         f"{rows}: resize it (model.resize_token_embeddings(len(tokenizer))) and save it")
    if tokenizer.pad_token_id is None:  # only a filler: masks come from lengths, never from the pad id
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (Qwen3 lists two)."""
    listed = getattr(model.generation_config, "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *([listed] if isinstance(listed, int) else listed or [])})


def pad_left(prompts: list[list[int]], pad_token_id: int, device, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask (B, P), pads (mask 0) on the left: every prompt ends in the last column. P is the
    longest prompt's length, or width if that is more."""
    width = max(width, *map(len, prompts))
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def next_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator=None, noise=None):
    """One token per row (B,) from logits (B, V): greedy at temperature 0, else a draw from filtered_logits. Given
    noise E (B, K) ~ Exp(1), the draw is the exponential race argmax p / E, what torch.multinomial(p, 1) computes
    with its generator's noise: a compiled step takes the noise from outside (a seeded generator breaks its graph)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits, ids = filtered_logits(logits, temperature, top_p, top_k)  # (B, K), (B, K) or None
    probs = logits.softmax(-1)
    drawn = torch.multinomial(probs, 1, generator=generator) if noise is None else (probs / noise).argmax(-1, True)
    return (drawn if ids is None else ids.gather(-1, drawn)).squeeze(-1)  # drawn (B, 1): a column of logits


def filtered_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int):
    """Logits in float32 after temperature, top-k and top-p, in that order (as transformers, except that a tie with
    the k-th best is not kept), those left out at -inf, and the token of each column. With top_k the k best, sorted:
    (B, k) and their ids (B, k), so that top-p sorts k logits, not V; without, (B, V) and None."""
    logits, ids = logits.float() / temperature, None
    if top_k > 0:
        logits, ids = logits.topk(min(top_k, logits.size(-1)))  # (B, k) each, best first
    if top_p < 1:
        sorted_logits, order = (logits, None) if ids is not None else logits.sort(-1, descending=True)  # (B, K)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, -math.inf)
        logits = sorted_logits if order is None else logits.scatter(-1, order, sorted_logits)
    return logits, ids


def decode_step(model, token, mask, position, cache_position, cache, temperature, top_p, top_k, noise=None,
                generator=None) -> torch.Tensor:
    """The token (B, 1) after token (B, 1) at positions (B, 1), attending over the mask's columns (cache_position: the
    token's column). The fast path compiles it: it is then given the noise of the draw, not a generator (next_token)."""
    logits = model(input_ids=token, attention_mask=mask, position_ids=position, cache=cache,
                   cache_position=cache_position, logits_to_keep=1).logits[:, -1]  # (B, V)
    return next_token(logits, temperature, top_p, top_k, generator, noise)[:, None]


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
           generator: torch.Generator | None = None, fast: bool = False) -> list[list[int]]:
    """One completion per prompt. Each ends after its first EOS (kept; eos_token_id is one id or a list of
    them, e.g. stop_ids) or at max_new_tokens. The prompt is read in one forward pass (the prefill), then one token
    at a time with a KV cache. fast=True (for GPUs) runs the same loop on fixed shapes, compiled (the fast path
    below): the same tokens at temperature 0, and, from the same generator state at a power-of-two batch size, the
    same draws (up to rounding near ties)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: a completion needs at least one token")
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if fast and slides(model):  # said once per process (a warning)
        warnings.warn(f"{type(model).__name__} has sliding-window layers: it samples on the plain loop (compiled, "
                      "its decode step would recompile at every token)")
        fast = False
    rows = len(prompts)
    if fast:  # a power of two rows (copies of the first prompt): a smaller last batch runs the full batch's graph
        prompts = prompts + prompts[:1] * ((1 << (rows - 1).bit_length()) - rows)
    width = max(BUCKET, 1 << (max(map(len, prompts)) - 1).bit_length()) if fast else 0  # fast: a power of two
    ids, prompt_mask = pad_left(prompts, pad_token_id or 0, model.device, width)  # (B, P)
    P = ids.size(1)
    mask = F.pad(prompt_mask, (0, max_new_tokens))  # (B, P + N), 1 where a token is written
    position = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): positions count real tokens only
    cache = static_cache(model, len(prompts), P + max_new_tokens) if fast else DynamicCache(config=model.config)
    cache.reset()  # a static cache is reused
    # The mask spans the keys attended over: a static cache's P + N columns, a growing cache's P + t.
    logits = model(input_ids=ids, attention_mask=mask if fast else prompt_mask, position_ids=position, cache=cache,
                   cache_position=torch.arange(P, device=model.device), logits_to_keep=1).logits[:, -1]  # (B, V)
    check_cache_used(cache, P)
    token = next_token(logits, temperature, top_p, top_k, generator)[:, None]  # (B, 1); the prefill is not compiled
    step = compiled_decode_step(BACKEND, model.device.type == "cuda") if fast else decode_step
    # (transformers 5.24 writes the cache at its own counter; cache_position, equal to it, marks the mask column)
    cache_position, position = torch.tensor([P], device=model.device), position[:, -1:] + 1
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=model.device)  # made once, not once per token
    finished, tokens = torch.isin(token[:rows, 0], stop_tensor), [token]
    K = min(top_k, logits.size(-1)) if top_k > 0 else logits.size(-1)  # the logits each draw is among
    noise = torch.empty(len(prompts), K, dtype=torch.float32, device=model.device) if fast and temperature else None
    with packed_attention(model, fast):
        for t in range(1, max_new_tokens):
            if stops and (t % CHECK_EVERY == 0 or not fast) and finished.all():  # a wait for the device
                break
            mask.index_fill_(1, cache_position, 1)
            if fast:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs (cloned) may now be overwritten
            if noise is not None:  # (B, K): a compiled step is given its draw's noise E ~ Exp(1) (next_token),
                noise.exponential_(generator=generator)  # drawn as torch.multinomial draws it
            token = step(model, token, mask if fast else mask[:, :P + t], position, cache_position, cache,
                         temperature, top_p, top_k, noise, None if fast else generator).clone()  # (B, 1)
            tokens.append(token)
            finished |= torch.isin(token[:rows, 0], stop_tensor)
            cache_position += 1
            position += 1
    return cut_after_stop(torch.cat(tokens, 1)[:rows], stops)


def check_cache_used(cache, width: int):
    """After the prefill the cache must hold the prompt's width. A model that ignores its cache predicts every token
    from itself alone: wrong samples and no error (transformers before 5.24 drops cache= silently)."""
    if int(cache.get_seq_length()) != width:
        raise ValueError(f"the model did not fill its KV cache (transformers {transformers.__version__}; opsd "
                         "passes cache=, which needs 5.24 or later, and a model's own code, trust_remote_code, "
                         "may take only past_key_values): pip install 'transformers>=5.24,<6'")


def cut_after_stop(tokens: torch.Tensor, stops: list[int]) -> list[list[int]]:
    """Each row of tokens (B, N) up to and with its first stop id: rows that finished early carry junk after it."""
    return [row[:next((i + 1 for i, token in enumerate(row) if token in stops), len(row))] for row in tokens.tolist()]


# ---------------------------------------------------------------------------------------------------------
# The fast path, sample(fast=True). On a GPU the plain loop spends most of its time in Python: each token launches
# hundreds of small kernels (every layer, every LoRA adapter), the cache grows and `finished.all()` waits for the GPU.
# gpt-fast's tricks instead: a static cache, fixed shapes, the decode step compiled into a CUDA graph, rare checks.

BUCKET = 64  # prompts are left-padded to 64, 128, 256... tokens: a handful of compiled graphs, not one per length
CHECK_EVERY = 16  # tokens between the checks whether every row is done: the loop's only waits for the GPU
BACKEND = "inductor"  # torch.compile's backend; the tests count compilations with their own
PACKED = "opsd_packed_sdpa"  # the attention the fast path gives a model that uses transformers' SDPA


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA, but one query token attends with its grouped-query heads packed, reading the cache once:
    (B, H, 1, D) -> (B, H_kv, H / H_kv, D), as transformers does uncompiled (compiled, repeat_kv copies it per head)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.size(2) > 1 or groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap") or (
            attention_mask is not None and attention_mask.size(1) > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    B, H, _, D = query.shape
    packed = query.reshape(B, H // groups, groups, D)  # (B, H_kv, H / H_kv, D), and so is out
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(B, 1, H, value.size(-1)), None  # (B, 1, H, D): H_kv x groups is the head order


AttentionInterface.register(PACKED, packed_sdpa)
AttentionMaskInterface.register(PACKED, sdpa_mask)  # the same masks as SDPA


@contextlib.contextmanager
def packed_attention(model, on: bool):
    """packed_sdpa inside the block, for a model that uses transformers' SDPA; a model's own attention otherwise."""
    sdpa = on and model.config._attn_implementation == "sdpa"
    if sdpa:
        model.set_attn_implementation(PACKED)
    try:
        yield
    finally:
        if sdpa:
            model.set_attn_implementation("sdpa")


@functools.cache
def compiled_decode_step(backend, cuda: bool):
    """decode_step compiled whole (fullgraph: an unsupported op is an error, not a silent slow path), a graph per
    shape, sampling setting and adapters on or off; on CUDA, mode reduce-overhead makes each a CUDA graph."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # default 8: an error
    return torch.compile(decode_step, backend=backend, mode="reduce-overhead" if cuda and backend == "inductor"
                         else None, fullgraph=True, dynamic=False)


@functools.lru_cache(maxsize=4)
def static_cache(model, batch_size: int, length: int) -> StaticCache:
    """A KV cache at its final length, made once per model and shape (a CUDA graph needs fixed addresses) and reset
    before each use. The last four stay allocated (rollouts and evaluations): static_cache.cache_clear() frees them."""
    return StaticCache(config=model.config, max_cache_len=length)


def slides(model) -> bool:
    """Whether some layers attend over a sliding window (Mistral, Gemma 2, 3): their static cache counts in a Python
    int, so the compiled step would recompile at every token (they sample on the plain loop)."""
    config = model.config.get_text_config()
    layers = getattr(config, "layer_types", None) or []
    return "sliding_attention" in layers or (not layers and getattr(config, "sliding_window", None) is not None)
