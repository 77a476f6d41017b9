"""Generated tokens per second of the rollout sampler: opsd's plain loop (sampling.sample) and its fast path
(fast=True: static cache, compiled decode step) against transformers' generate with its dynamic cache and with a
static cache (which generate compiles itself on a GPU), on the same model, the same batch and the same prompts,
greedy, so that all four should write the same tokens (counted).
Each is run twice and the second run is timed: the first one warms up (and compiles). It prints the card.

    python benchmarks/sampler.py            # on a GPU: random weights in Qwen3-1.7B's shape, bf16, LoRA r64,
                                            # 32 prompts x 1,024 new tokens (a random model never stops early)
    python benchmarks/sampler.py --quick    # the shipped tiny model on a CPU, 16 prompts x 40 tokens: seconds
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import builtin_examples, char_tokenizer, encode, student_prompt  # noqa: E402
from lora import add_lora  # noqa: E402
from real_shape import QWEN3_1_7B  # noqa: E402
from sampling import load_model, pad_left, sample, stop_ids  # noqa: E402


def until_stop(row: list[int], stops: list[int]) -> list[int]:
    """A completion as sample returns it: up to and with its first stop id."""
    ends = [i for i, token in enumerate(row) if token in stops]
    return row[:ends[0] + 1] if ends else row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model, 16 x 40 tokens, on the CPU")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=1024)
    parser.add_argument("--lora_rank", type=int, default=64, help="adapters on every projection; 0: none")
    args = parser.parse_args()
    if args.quick:
        model, tokenizer = load_model("tiny/model", "float32")
        batch_size, new_tokens, rank = 16, 40, 0
    else:
        tokenizer = char_tokenizer()  # ids past its 104 tokens decode to nothing: fine for random rollouts
        device = "cuda" if torch.cuda.is_available() else "cpu"
        config = Qwen3Config(**QWEN3_1_7B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.device(device):
            model = Qwen3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
        batch_size, new_tokens, rank = args.batch_size, args.max_new_tokens, args.lora_rank
        if rank:
            add_lora(model, rank, 128.0, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".split(","))
    model.eval()
    prompts = [encode(student_prompt(ex, tokenizer), tokenizer) for ex in builtin_examples("test", batch_size)]
    stops, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id
    ids, mask = pad_left(prompts, pad, model.device)  # (B, P), (B, P)

    def generate(cache):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             cache_implementation=cache, eos_token_id=stops, pad_token_id=pad)
        return [until_stop(row, stops) for row in out[:, ids.size(1):].tolist()]

    methods = {"plain loop (sampling.sample)": lambda: sample(model, prompts, new_tokens, 0.0, eos_token_id=stops,
                                                              pad_token_id=pad),
               "fast path (sample, fast=True)": lambda: sample(model, prompts, new_tokens, 0.0, eos_token_id=stops,
                                                               pad_token_id=pad, fast=True),
               "generate, dynamic cache": lambda: generate("dynamic"),
               "generate, static cache": lambda: generate("static")}
    card = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    print(f"{card}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads: {batch_size} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, up to {new_tokens} new tokens, greedy, "
          f"{model.dtype}, " + (f"LoRA r{rank}" if rank else "no LoRA"))
    results = {}
    for name, run in methods.items():
        with torch.no_grad():
            run()  # warm-up (and, for a static cache on a GPU, compilation)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            completions = run()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
        results[name] = (time.perf_counter() - start, completions)
    plain_seconds, plain = next(iter(results.values()))
    plain_rate = sum(map(len, plain)) / plain_seconds
    for name, (seconds, completions) in results.items():
        rate = sum(map(len, completions)) / seconds
        same = sum(a == b for a, b in zip(completions, plain))
        print(f"{name:30} {seconds:7.2f} s {rate:9.0f} generated tokens/s  {rate / plain_rate:5.2f}x the plain "
              f"loop  rows identical to the plain loop's: {same}/{len(plain)}")


if __name__ == "__main__":
    main()
