"""OPSD at a real model's size without downloading one: a randomly initialised model with Qwen3-1.7B's
shape, trained for a few steps with the paper's recipe (bf16 on a GPU, LoRA r64 on every projection, forward
KL with clip 0.05, 32 rollouts of up to 1024 tokens per step) through opsd.train itself. It prints the card,
the peak memory, the step time and the tokens per second (the held-out evaluation is skipped), and where a
step's time goes: sampling, the teacher's forward passes, the student's forward and backward passes, the
optimizer (timed by wrapping opsd's functions here, so that opsd.py itself stays free of timers). A random
model almost never samples its EOS, so every rollout runs to the limit: the worst case for time and memory.
The prompts are the built-in problems with the reference solution padded to --reference_tokens (the
paper's references are long), handed to train directly (no data set file: `datasets` is not needed).

    python benchmarks/real_shape.py                   # on a GPU; a step took 2 minutes on an H200 (see README)
    python benchmarks/real_shape.py --micro_batch_size 4 --no-gradient_checkpointing
    python benchmarks/real_shape.py --fast_sampling   # rollouts with a static cache and a compiled decode step
    python benchmarks/real_shape.py --tiny            # a scaled-down shape on a CPU: checks the script
    python benchmarks/real_shape.py --results r.jsonl # also appends the measurements as one JSON line
"""

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import opsd  # noqa: E402
import sampling  # noqa: E402
from data import Example, builtin_examples, char_tokenizer  # noqa: E402
from opsd import Config, train  # noqa: E402

QWEN3_1_7B = dict(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
                  tie_word_embeddings=True)
TINY = dict(QWEN3_1_7B, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def record(path: str | None, row: dict):
    """Appends row to the JSONL file at path (the GPU check's results), if one is given."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def timed(function, phase, totals):
    """function, adding its wall time to totals[phase(*args)] (a GPU's queued work included)."""
    def wrapper(*args, **kwargs):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        key = phase(*args)
        sync()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        sync()
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
        return result
    return wrapper


def time_the_phases(totals):
    """Wraps the functions of one step: rollouts, the two-context forwards (the teacher's run under no_grad,
    the student's with gradients), the optimizer step and the whole of train_step; backward is the rest."""
    opsd.collect_rollouts = timed(opsd.collect_rollouts, lambda *a: "sampling", totals)
    for name in ("completion_hidden", "completion_logits"):
        setattr(opsd, name, timed(getattr(opsd, name), lambda *a: "student forward" if torch.is_grad_enabled()
                                  else "teacher forward", totals))
    torch.optim.AdamW.step = timed(torch.optim.AdamW.step, lambda *a: "optimizer", totals)
    opsd.train_step = timed(opsd.train_step, lambda *a: "train_step", totals)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small shape and short rollouts, for a CPU")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps; the first one is not timed")
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--reference_tokens", type=int, default=1000, help="length of each reference solution")
    parser.add_argument("--fast_sampling", action="store_true", help="rollouts on sample's fast path")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the fast sampler")
    parser.add_argument("--results", help="append the measurements to this JSONL file")
    args = parser.parse_args()
    sampling.BACKEND = args.backend
    shape = TINY if args.tiny else QWEN3_1_7B
    rollout, batch_size = (16, 8) if args.tiny else (1024, 32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = char_tokenizer()  # ids past its 104 tokens decode to nothing: fine for random rollouts
        config = Qwen3Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.device(device):
            model = Qwen3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model  # train() loads it again: count only what training holds
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        problems = []
        for ex in builtin_examples("train", 400):
            padding = "check: " + ex.solution.split(".")[0] + ". "  # one character, one token
            problems.append(Example(ex.question, padding * (args.reference_tokens // len(padding)) + ex.solution,
                                    ex.answer))
        opsd.load_data = lambda cfg: (problems[4:], problems[:4])
        cfg = Config(model=tmp, out_dir=str(Path(tmp) / "run"), steps=args.steps,
                     batch_size=batch_size, micro_batch_size=min(args.micro_batch_size, batch_size),
                     max_new_tokens=rollout, temperature=1.1, top_p=0.95, top_k=20, beta=0.0, clip=0.05,
                     lora_rank=64, lora_alpha=128, lr=5e-6, lr_schedule="constant", grad_clip=0.1,
                     eval_every=args.steps,
                     eval_size=4, save_every=args.steps, gradient_checkpointing=args.gradient_checkpointing,
                     fast_sampling=args.fast_sampling)
        # The held-out evaluation (a random model scores nothing) is not what this measures: skipped.
        opsd.evaluate_both = lambda *args: {"student_acc": math.nan, "teacher_acc": math.nan}
        totals = {}  # seconds per phase over all steps
        time_the_phases(totals)
        train_step = opsd.train_step  # a row as each step ends: a run out of time still says how far it got
        opsd.train_step = lambda *a, **k: (train_step(*a, **k), record(args.results, {
            "part": "step_progress", "seconds_so_far": dict(totals)}))[0]
        train(cfg)
        rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r][1:] or [r for r in rows if "loss" in r]  # the first step warms up
    shape_name = "a tiny Qwen3 shape" if args.tiny else "Qwen3-1.7B's shape"
    print(f"\n{card}, torch {torch.__version__}: random weights in {shape_name} ({params / 1e9:.2f}B parameters), "
          f"bf16 on a GPU, LoRA r64, {cfg.batch_size} rollouts x "
          f"{rollout} tokens per step, micro-batch {cfg.micro_batch_size}, gradient checkpointing "
          f"{'on' if cfg.gradient_checkpointing else 'off'}, references of {args.reference_tokens} tokens, "
          f"the divergence's {'fused' if steps[-1]['fused'] else 'plain'} path, the "
          f"{'fast' if args.fast_sampling else 'plain'} sampler")
    print(f"step time {statistics.median(r['seconds'] for r in steps):.1f} s (median of {len(steps)}), "
          f"{statistics.median(r['tokens_per_s'] for r in steps):.0f} generated tokens/s, mean rollout "
          f"{statistics.mean(r['length'] for r in steps):.0f} tokens, peak memory "
          + (f"{max(r['peak_memory_gb'] for r in steps):.1f} GiB" if device == "cuda" else "n/a on CPU"))
    totals["backward"] = totals.pop("train_step") - sum(totals.get(k, 0.0) for k in (
        "teacher forward", "student forward", "optimizer"))
    total = sum(totals.values())
    split = {phase: totals.get(phase, 0.0) / total for phase in (
        "sampling", "teacher forward", "student forward", "backward", "optimizer")}
    print(f"time split over all {len([r for r in rows if 'loss' in r])} steps (the first included): " + ", ".join(
        f"{phase} {share:.0%}" for phase, share in split.items()))
    record(args.results, {"part": "step", "card": card, "fast_sampling": args.fast_sampling, "tiny": args.tiny,
                          "first_step_s": next(r["seconds"] for r in rows if "loss" in r),
                          "step_s": statistics.median(r["seconds"] for r in steps),
                          "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
                          "peak_memory_gb": max(r.get("peak_memory_gb", 0) for r in steps), "split": split})


if __name__ == "__main__":
    main()
