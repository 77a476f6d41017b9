"""Generated tokens per second of the rollout sampler at the recipe's shape: opsd's fast path (sample,
fast=True) and plain loop (sampling.sample), and what a user would pick instead: transformers' generate with its
dynamic cache, its continuous batching (generate_batch) and generate with a static cache (which it compiles
itself on a GPU). Each line is printed, and appended as JSON to --results, as soon as it is measured.
The compiled methods are called twice at full length: the first call (compilation included) and the second,
timed. The others, far slower per token on a GPU, are timed on --baseline_tokens after a short warm-up. Right
after the fast path, a profile of a short fast call lists its top kernels.
--check tests the fast path where it runs instead: greedy float32 tokens equal to the plain loop's, seeded
draws reproducible, and the CUDA-graph fallbacks counted (gpu_check.sh sets TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1,
so that a fallback to eager is an error, not a silent slow path).

    python benchmarks/sampler.py          # GPU: random weights in Qwen3-1.7B's shape, bf16, LoRA r64 on every
                                          # projection, 32 rollouts x 1,024 tokens at T 1.1, top-p 0.95, top-k 20
    python benchmarks/sampler.py --check  # the correctness part, on a tiny Qwen3 in float32
    python benchmarks/sampler.py --tiny --backend eager   # a tiny shape on a CPU: checks the script in seconds
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sampling  # noqa: E402
from data import builtin_examples, char_tokenizer, encode, student_prompt  # noqa: E402
from lora import add_lora, lora_layers  # noqa: E402
from real_shape import QWEN3_1_7B, TINY, record  # noqa: E402
from sampling import pad_left, sample, stop_ids  # noqa: E402

RECIPE = dict(temperature=1.1, top_p=0.95, top_k=20)  # the paper's rollout settings
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: dict, device: str, dtype, rank: int):
    tokenizer = char_tokenizer()  # ids past its 104 tokens decode to nothing: fine for random rollouts
    config = Qwen3Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype).eval()
    if rank:
        add_lora(model, rank, 2.0 * rank, TARGETS)
    return model, tokenizer


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(args, device: str) -> bool:
    """The fast path on this device: tokens, reproducibility, CUDA-graph fallbacks."""
    model, tokenizer = build(dict(TINY, vocab_size=512), device, torch.float32, rank=4)
    for weight in (p for p in model.parameters() if p.dim() == 2):  # large weights: varied tokens, so that
        torch.nn.init.normal_(weight, std=1.0)  # a wrong position or mask changes them (the default init repeats one)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    prompts = [[5, 9, 17, 40], [33, 2, 60, 61, 62, 70, 80, 12, 13], [44], [90, 91, 92, 93, 94, 95]]
    plain = sample(model, prompts, 24, 0.0)
    fast = sample(model, prompts, 24, 0.0, fast=True)

    def draw(seed):
        return sample(model, prompts, 24, **RECIPE, generator=torch.Generator(device).manual_seed(seed), fast=True)
    reproducible = draw(1) == draw(1) and draw(1) != draw(2)
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] if device == "cuda" else 0  # none on a CPU
    row = {"part": "check", "device": device, "greedy_equal": fast == plain, "seeded_reproducible": reproducible,
           "cudagraph_skips": skips}
    row["ok"] = row["greedy_equal"] and row["seeded_reproducible"] and not skips
    print(json.dumps(row), flush=True)
    record(args.results, row)
    return row["ok"]


def methods(model, prompts, stops, pad):
    """name -> (compiled, function of max_new_tokens that returns the completions)."""
    ids, mask = pad_left(prompts, pad, model.device)  # (B, P), (B, P)

    def generate(n, cache):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=True, **RECIPE,
                             cache_implementation=cache, eos_token_id=stops, pad_token_id=pad)
        return sampling.cut_after_stop(out[:, ids.size(1):], stops)

    def generate_batch(n):
        config = GenerationConfig(max_new_tokens=n, do_sample=True, **RECIPE, eos_token_id=stops, pad_token_id=pad)
        return [o.generated_tokens for o in model.generate_batch(prompts, config).values()]
    return {"fast path (sample, fast=True)": (True, lambda n: sample(model, prompts, n, **RECIPE, eos_token_id=stops,
                                                                      pad_token_id=pad, fast=True)),
            "plain loop (sampling.sample)": (False, lambda n: sample(model, prompts, n, **RECIPE, eos_token_id=stops,
                                                                     pad_token_id=pad)),
            "generate, dynamic cache": (False, lambda n: generate(n, "dynamic")),
            "generate_batch (continuous batching)": (True, generate_batch),
            "generate, static cache (compiled on CUDA)": (True, lambda n: generate(n, "static"))}


def measure(name, compiled, run, prompts, new_tokens, baseline_tokens, device, results):
    """Times one method, prints its line and records it; a method that fails says so and the others go on."""
    try:
        start = time.perf_counter()
        run(new_tokens if compiled else 8)  # compiles, or warms up
        sync(device)
        first = time.perf_counter() - start
        n = new_tokens if compiled else baseline_tokens
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        completions = run(n)
        sync(device)
        seconds = time.perf_counter() - start
        if len(completions) != len(prompts):  # generate_batch reports its own failures by returning fewer
            raise RuntimeError(f"{len(completions)} completions for {len(prompts)} prompts")
    except Exception as e:  # noqa: BLE001 (a benchmark column: report it and go on)
        print(f"{name:42} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        record(results, {"part": "rollouts", "method": name, "failed": f"{type(e).__name__}: {e}"[:500]})
        return
    tokens, steps = sum(map(len, completions)), max(map(len, completions))
    row = {"part": "rollouts", "method": name, "first_call_s": first, "seconds": seconds, "new_tokens": n,
           "tokens": tokens, "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / steps,
           "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    print(f"{name:42} first call {first:6.1f} s, then {seconds:6.2f} s for {tokens} tokens ({n} per row): "
          f"{row['tokens_per_s']:7.0f} tokens/s, {row['ms_per_step']:6.2f} ms per decode step"
          + (f", peak {row['peak_memory_gb']:.1f} GiB" if row["peak_memory_gb"] else ""), flush=True)
    record(results, row)


def profile(model, prompts, new_tokens, device, results):
    """The kernels (or, on a CPU, the operators) that took the most time in a short fast call: every id is a stop
    id, so it ends at the first all-done check (sampling.CHECK_EVERY tokens) in the graph the timed call used."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        sample(model, prompts, new_tokens, **RECIPE, eos_token_id=list(range(model.config.vocab_size)), fast=True)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:10]
    top = [{"name": e.key[:80], "ms": getattr(e, key) / 1000, "calls": e.count} for e in events]
    print(f"top of the fast path's profile ({sampling.CHECK_EVERY} tokens):\n" + "\n".join(f"  {t['ms']:9.1f} ms {t['calls']:7d} x  {t['name']}"
                                                         for t in top), flush=True)
    record(results, {"part": "profile", "top": top})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="the correctness part only")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, for a CPU")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=1024)
    parser.add_argument("--baseline_tokens", type=int, default=128, help="new tokens of the uncompiled methods")
    parser.add_argument("--lora_rank", type=int, default=64, help="adapters on every projection; 0: none")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the fast path")
    parser.add_argument("--results", help="append each measurement to this JSONL file")
    args = parser.parse_args()
    sampling.BACKEND = args.backend
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check:
        sys.exit(0 if check(args, device) else 1)
    new_tokens, baseline_tokens = (16, 8) if args.tiny else (args.max_new_tokens, args.baseline_tokens)
    model, tokenizer = build(TINY if args.tiny else QWEN3_1_7B, device,
                             torch.bfloat16 if device == "cuda" else torch.float32, args.lora_rank)
    batch = 4 if args.tiny else args.batch_size
    prompts = [encode(student_prompt(ex, tokenizer), tokenizer) for ex in builtin_examples("test", batch)]
    stops, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    print(f"{card}, torch {torch.__version__}: {batch} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens, {new_tokens} new tokens at {RECIPE}, {model.dtype}, LoRA r{args.lora_rank} (random weights: the "
          "rollouts run to the limit)", flush=True)
    record(args.results, {"part": "rollouts", "card": card, "batch": batch, "new_tokens": new_tokens})
    for i, (name, (compiled, run)) in enumerate(methods(model, prompts, stops, pad).items()):
        measure(name, compiled, run, prompts, new_tokens, baseline_tokens, model.device, args.results)
        if i == 0:  # right after the fast path, before the slow columns can run out of time
            profile(model, prompts, new_tokens, model.device, args.results)


if __name__ == "__main__":
    main()
