"""The sampler (plain and fast) against transformers' generate, and the two-context forward pass against
one-at-a-time."""

import pytest
import torch

from conftest import make_model
from lora import add_lora, lora_layers
from opsd import completion_hidden, completion_logits
from sampling import PACKED, decode_step, next_token, packed_sdpa, sample, stop_ids

PROMPTS = [[5, 9, 17, 40], [33, 2, 60, 61, 62, 70, 80, 12, 13], [44], [90, 91, 92, 93, 94, 95]]


def generate_alone(model, prompt, max_new_tokens, eos_token_id):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_sample_equals_generate_on_each_prompt_alone(model):
    # As EOS take a token that one prompt's greedy continuation reaches at its third step, so that one
    # row stops early (and keeps its EOS) while the others run to max_new_tokens.
    eos = generate_alone(model, PROMPTS[1], 3, None)[2]
    expected = [generate_alone(model, p, 12, eos) for p in PROMPTS]
    got = sample(model, PROMPTS, 12, temperature=0, eos_token_id=eos, pad_token_id=0)
    assert got == expected
    assert len(got[1]) <= 3 and got[1][-1] == eos
    assert any(len(row) == 12 for row in got)


def test_a_row_stops_at_any_of_several_eos_ids(model, tokenizer):
    """Qwen3 ends a turn with either of two ids; a row that emits the second must stop there too."""
    free = sample(model, PROMPTS, 12, temperature=0)  # random weights: each row repeats one token
    first, second = free[0][0], free[1][0]
    assert first != second and not {first, second} & {*free[2], *free[3]}
    got = sample(model, PROMPTS, 12, temperature=0, eos_token_id=[first, second], pad_token_id=0)
    assert got == [generate_alone(model, p, 12, [first, second]) for p in PROMPTS]
    assert got[:2] == [[first], [second]] and len(got[2]) == len(got[3]) == 12
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    assert stop_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, second})
    model.generation_config.eos_token_id = second
    assert stop_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, second})
    model.generation_config = None
    assert stop_ids(model, tokenizer) == [tokenizer.eos_token_id]


def test_sampling_is_reproducible_with_a_generator(model):
    def draw(seed):
        return sample(model, PROMPTS, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_no_new_tokens_is_an_error(model):
    with pytest.raises(ValueError, match="max_new_tokens=0: a completion needs at least one token"):
        sample(model, PROMPTS, 0)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = sample(model, PROMPTS, 8, temperature=0)
    assert sample(model, PROMPTS, 8, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0)) == greedy
    assert sample(model, PROMPTS, 8, temperature=1.5, top_p=1e-6, generator=torch.Generator().manual_seed(0)) == greedy


def test_next_token_keeps_only_the_top_k_and_the_top_p_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)  # (B, V)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, 1.0, 1.0, 2, g).tolist()) == {0, 1}
    # top_p=0.8: 0.5 + 0.3 reaches it, so tokens 2 and 3 are cut
    assert set(next_token(logits, 1.0, 0.8, 0, g).tolist()) == {0, 1}
    assert set(next_token(logits, 1.0, 0.81, 0, g).tolist()) == {0, 1, 2}
    counts = torch.bincount(next_token(logits, 1.0, 1.0, 0, g), minlength=4) / 4000
    assert torch.allclose(counts, probs, atol=0.03)


COMPLETIONS = [[7, 8, 9], [10, 11, 12, 13, 14, 15], [16], [17, 18]]


def test_completion_logits_line_up_with_an_unpadded_forward(model):
    logits, mask = completion_logits(model, PROMPTS, COMPLETIONS)
    assert logits.shape[:2] == mask.shape == (4, 6)
    assert mask.sum(1).tolist() == [3, 6, 1, 2]
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        with torch.no_grad():
            alone = model(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) + len(c) - 1]  # (L_i, V)
        torch.testing.assert_close(logits[i, :len(c)], alone, atol=1e-5, rtol=1e-5)
        single, _ = completion_logits(model, [p], [c])
        torch.testing.assert_close(logits[i, :len(c)], single[0], atol=1e-5, rtol=1e-5)


def test_student_and_teacher_score_the_same_completion_tokens(model):
    """The two-context pass: different prompts, same completions, same (B, L) layout and mask."""
    teacher_prompts = [p + [3, 4, 5] * (i + 1) for i, p in enumerate(PROMPTS)]
    s_logits, s_mask = completion_logits(model, PROMPTS, COMPLETIONS)
    t_logits, t_mask = completion_logits(model, teacher_prompts, COMPLETIONS)
    assert s_logits.shape == t_logits.shape and torch.equal(s_mask, t_mask)
    with torch.no_grad():
        p, c = teacher_prompts[1], COMPLETIONS[1]
        alone = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1]
    torch.testing.assert_close(t_logits[1], alone, atol=1e-5, rtol=1e-5)


def test_the_scoring_passes_build_no_kv_cache(model):
    """One pass over the whole sequence, for the student or the teacher: a cache would be built for nothing."""
    caches = []
    hook = model.base_model.register_forward_hook(
        lambda module, args, kwargs, output: caches.append(output.past_key_values), with_kwargs=True)
    completion_logits(model, PROMPTS, COMPLETIONS)
    completion_hidden(model, PROMPTS, COMPLETIONS)
    hook.remove()
    assert len(caches) == 2 and all(cache is None for cache in caches)


def test_completion_logits_are_finite_with_heavy_padding(model):
    logits, _ = completion_logits(model, [[1] * 30, [2]], [[3], [4] * 20])
    assert torch.isfinite(logits).all()


# The fast path (sample(fast=True)): the plain loop's tokens (greedy as generate's, and sampled), one compilation.

@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("lora", [False, True])
def test_fast_greedy_equals_the_plain_loop_and_generate(kind, lora, tokenizer, compilations):
    model = make_model(kind, tokenizer)
    for weight in (p for p in model.parameters() if p.dim() == 2):  # large weights: each row writes a varied
        torch.nn.init.normal_(weight, std=1.0)  # sequence (the default init repeats one token), so positions matter
    if lora:
        add_lora(model, 4, 8.0, ["q_proj", "v_proj", "down_proj"])
        for layer in lora_layers(model):  # B is zero at first: give the adapters something to change
            torch.nn.init.normal_(layer.lora_B, std=0.5)
    free = sample(model, PROMPTS, 12, temperature=0)
    eos = [free[1][5], free[3][8]]  # two stop ids
    plain = sample(model, PROMPTS, 12, temperature=0, eos_token_id=eos, pad_token_id=0)
    assert len(set(map(len, plain))) >= 3 and max(map(len, plain)) == 12  # rows end at different steps, or never
    fast = sample(model, PROMPTS, 12, temperature=0, eos_token_id=eos, pad_token_id=0, fast=True)
    assert fast == plain == [generate_alone(model, p, 12, eos) for p in PROMPTS]
    assert sample(model, PROMPTS[::-1], 12, temperature=0, eos_token_id=eos, pad_token_id=0, fast=True) == plain[::-1]
    assert compilations[0] == 1  # one decode graph for every step of both calls, however the rows finished


def test_fast_sampling_is_reproducible_with_a_generator(tokenizer, compilations):
    model = make_model("llama", tokenizer)

    def draw(seed, **kwargs):
        return sample(model, PROMPTS, 10, generator=torch.Generator().manual_seed(seed), fast=True, **kwargs)
    assert draw(1) == draw(1) and draw(1) != draw(2)
    assert draw(1, temperature=1.5, top_k=1) == draw(1, temperature=1.5, top_p=1e-6) == sample(model, PROMPTS, 10, 0)


def test_fast_sampling_draws_the_plain_loops_tokens_at_a_power_of_two_batch(tokenizer, compilations):
    """torch.multinomial(p, 1) is the race argmax p / E on its generator's noise E ~ Exp(1); the fast path draws that
    noise itself, from the same generator: with no padding rows (4 prompts), it samples what the plain loop samples."""
    model = make_model("llama", tokenizer)
    for weight in (p for p in model.parameters() if p.dim() == 2):
        torch.nn.init.normal_(weight, std=1.0)
    for settings in ({}, {"top_k": 5}, {"top_p": 0.9}, {"top_k": 8, "top_p": 0.8, "temperature": 1.3}):
        def draw(seed=3, **kwargs):
            return sample(model, PROMPTS, 12, generator=torch.Generator().manual_seed(seed), **settings, **kwargs)
        plain = draw()
        assert draw(fast=True) == plain != draw(seed=4)  # the same draws, and draws that depend on the noise


def test_fast_sampling_takes_more_shapes_than_dynamos_default_recompile_limit(tokenizer, compilations):
    model = make_model("llama", tokenizer)
    for new_tokens in range(3, 13):  # ten cache lengths, one graph each: the default limit (8) would be an error
        assert sample(model, PROMPTS, new_tokens, temperature=0, fast=True) == sample(model, PROMPTS, new_tokens, 0)
    assert compilations[0] == 10


def test_a_smaller_last_batch_runs_the_full_batchs_graph(tokenizer, compilations):
    model = make_model("llama", tokenizer)
    for rows in (4, 3, 1):  # padded to 4, 4 and 1 rows
        assert sample(model, PROMPTS[:rows], 6, 0, fast=True) == sample(model, PROMPTS[:rows], 6, 0)
    assert compilations[0] == 2


@pytest.mark.parametrize("fast", [False, True])
def test_a_model_that_ignores_its_cache_is_an_error_not_wrong_samples(fast, tokenizer, monkeypatch, compilations):
    """transformers before 5.24 drops cache= into **kwargs: every token would be predicted from itself alone."""
    model = make_model("llama", tokenizer)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *args, cache=None, **kwargs: forward(*args, **kwargs))
    with pytest.raises(ValueError, match=r"did not fill its KV cache \(transformers .*pip install"):
        sample(model, PROMPTS, 4, temperature=0, fast=fast)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits are always the same, for the draw alone."""
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **kwargs):
        return type("Output", (), {"logits": self.logits.expand(input_ids.size(0), 1, -1)})()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.75), (4, 0.6)])
def test_both_draws_follow_the_filtered_distribution(top_k, top_p):
    probs = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.15, 0.13])
    logits = probs.log()[None]  # (1, V)
    kept = torch.zeros(6, dtype=torch.bool)  # what top-k then top-p keep, by hand
    order = probs.argsort(descending=True)[:top_k or 6]
    mass = 0.0
    for i in order.tolist():
        if mass < top_p:
            kept[i] = True
        mass += probs[i] / probs[order].sum()
    expected = torch.where(kept, probs, 0) / probs[kept].sum()
    n, g = 20_000, torch.Generator().manual_seed(0)
    plain = next_token(logits.expand(n, -1), 1.0, top_p, top_k, g)
    noise = torch.empty(n, top_k or 6).exponential_(generator=g)
    race = decode_step(FixedLogits(logits[None]), torch.zeros(n, 1, dtype=torch.long), None, None, None, None, 1.0,
                       top_p, top_k, noise)[:, 0]
    for draws in (plain, race):
        frequency = torch.bincount(draws, minlength=6) / n
        assert torch.allclose(frequency, expected, atol=0.015), (frequency, expected)
        assert not frequency[~kept].any()


def test_packed_attention_reads_the_cache_once_and_equals_transformers(monkeypatch):
    """Compiled, transformers' SDPA copies keys and values to every query head (repeat_kv); packed_sdpa never does,
    and gives the same output."""
    from transformers.integrations import sdpa_attention
    g = torch.Generator().manual_seed(0)
    module = type("Attention", (), {"num_key_value_groups": 3, "is_causal": True})()
    query, key, value = (torch.randn(2, h, n, 8, generator=g) for h, n in ((6, 1), (2, 9), (2, 9)))
    mask = torch.rand(2, 1, 1, 9, generator=g) > 0.3
    expected, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    monkeypatch.setattr(sdpa_attention, "is_torchdynamo_compiling", lambda: True)
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: pytest.fail("the cache was copied per head"))
    with pytest.raises(pytest.fail.Exception):
        sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = packed_sdpa(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(got, expected)


def test_the_fast_path_leaves_training_forwards_unchanged(tokenizer, compilations):
    model = make_model("qwen3", tokenizer)
    before, _ = completion_logits(model, PROMPTS, COMPLETIONS)
    forward = model.model.layers[0].self_attn.forward
    model.model.layers[0].self_attn.forward = lambda *a, **k: (seen.append(model.config._attn_implementation),
                                                               forward(*a, **k))[1]
    seen = []
    sample(model, PROMPTS, 3, temperature=0, fast=True)
    assert seen == ["sdpa", PACKED, PACKED] and model.config._attn_implementation == "sdpa"  # the prefill, 2 steps
    torch.testing.assert_close(completion_logits(model, PROMPTS, COMPLETIONS)[0], before, atol=0, rtol=0)


def test_sliding_window_models_sample_on_the_plain_loop(tokenizer, compilations):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=4)).eval()
    with pytest.warns(UserWarning, match="sliding-window layers: it samples on the plain loop"):
        assert sample(model, PROMPTS, 8, 0, fast=True) == sample(model, PROMPTS, 8, 0)
    assert compilations[0] == 0
