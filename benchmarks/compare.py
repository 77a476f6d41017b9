"""OPSD against SFT and GRPO, and the paper's ablations, in miniature. Every run starts from the same base model
(tiny/model) on the built-in task and goes through the same loop (opsd.train) with the same budget: the same
number of optimizer steps of 32 sequences each (OPSD: 32 problems x 1 rollout; GRPO: 4 problems x 8
rollouts; SFT: 32 reference solutions, nothing generated). It records the held-out student accuracy against
optimizer steps, generated tokens and training seconds, and writes every point (points.jsonl), a plot
(compare.png) and a Markdown table with the token-efficiency ratio (compare.md).

    python benchmarks/compare.py            # about 25 minutes on 2 CPU cores
    python benchmarks/compare.py --quick    # every run for 2 steps: checks the script
"""

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one line per run instead of eight progress bars
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from opsd import Config, train  # noqa: E402

RUNS = {  # name: what differs from opsd.Config's defaults (JSD 0.5, fixed teacher, 32 problems, lr 1e-3)
    "OPSD": {},
    "SFT": {"method": "sft"},
    # GRPO's lr is its own: at OPSD's 1e-3 it collapsed within 20 steps (every group all wrong, no gradient
    # left), at 3e-4 it fell to 4-15%; 1e-4 was the best of the three (measured on 300-step runs).
    "GRPO (G=8)": {"method": "grpo", "group_size": 8, "batch_size": 4, "lr": 1e-4},
    "OPSD, forward KL": {"beta": 0.0},
    "OPSD, reverse KL": {"beta": 1.0},
    "OPSD, forward KL, clip 0.05": {"beta": 0.0, "clip": 0.05},
    "OPSD, current weights as teacher": {"teacher_decay": 0.0},
    "OPSD, EMA teacher 0.99": {"teacher_decay": 0.99},
}


def run(name: str, changes: dict, args) -> list[dict]:
    """Trains one run and returns its evaluations, each with the generated tokens and training seconds so far."""
    out_dir = Path(args.out) / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = Config(out_dir=str(out_dir), steps=args.steps, eval_every=args.eval_every, eval_size=args.eval_size,
                 save_every=args.steps, **changes)
    with redirect_stdout(io.StringIO()):
        train(cfg)
    points, tokens, seconds = [], 0, 0.0
    for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()):
        if "loss" in row:
            tokens, seconds = tokens + row["generated"], seconds + row["seconds"]
        else:
            points.append({"run": name, "step": row["step"], "generated_tokens": tokens, "seconds": seconds,
                           "student_acc": row["student_acc"], "teacher_acc": row["teacher_acc"]})
    return points


def plot(runs: dict[str, list[dict]], path: Path, title: str):
    """Held-out accuracy against optimizer steps and against generated tokens, one line per run."""
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for color, (name, points) in enumerate(runs.items()):
        style = dict(color=f"C{color}", marker="o", linestyle="-" if name in ("OPSD", "SFT", "GRPO (G=8)") else ":")
        by_step.plot([p["step"] for p in points], [p["student_acc"] for p in points], label=name, **style)
        if name != "SFT":  # SFT generates nothing
            by_tokens.plot([p["generated_tokens"] / 1000 for p in points], [p["student_acc"] for p in points], **style)
    by_step.set(xlabel="optimizer step", ylabel="held-out student accuracy (greedy)")
    by_tokens.set(xlabel="generated tokens (thousands; SFT generates none)")
    by_step.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def tokens_to_reach(points: list[dict], accuracy: float) -> int | None:
    return next((p["generated_tokens"] for p in points if p["student_acc"] >= accuracy), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--eval_size", type=int, default=200, help="held-out problems per evaluation (greedy)")
    parser.add_argument("--out", default="runs/compare", help="the runs, points.jsonl, compare.png, compare.md")
    parser.add_argument("--quick", action="store_true", help="2 steps per run, 4 held-out problems")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.eval_size = 2, 2, 4
    started = time.time()
    runs = {}
    for name, changes in RUNS.items():
        runs[name] = run(name, changes, args)
        last = runs[name][-1]
        print(f"{name:34} student {runs[name][0]['student_acc']:6.1%} -> {last['student_acc']:6.1%} "
              f"(best {max(p['student_acc'] for p in runs[name]):.1%}), {last['generated_tokens']:>9,} tokens "
              f"generated, {last['seconds'] / 60:4.1f} min", flush=True)
    out = Path(args.out)
    (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sum(runs.values(), [])))

    plot(runs, out / "compare.png", f"tiny/model, built-in task, {args.steps} steps of 32 sequences each")

    grpo = runs["GRPO (G=8)"]
    grpo_best = max(p["student_acc"] for p in grpo)
    lines = [f"`python benchmarks/compare.py`: {args.steps} steps per run, {args.eval_size} held-out problems, "
             f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}, {(time.time() - started) / 60:.0f} min in all.", "",
             "| run | student at step 0 | best | final | generated tokens | training minutes | "
             f"tokens to reach GRPO's best ({grpo_best:.1%}) |", "|---|---|---|---|---|---|---|"]
    for name, points in runs.items():
        reach = tokens_to_reach(points, grpo_best)
        lines.append(f"| {name} | {points[0]['student_acc']:.1%} | {max(p['student_acc'] for p in points):.1%} | "
                     f"{points[-1]['student_acc']:.1%} | {points[-1]['generated_tokens']:,} | "
                     f"{points[-1]['seconds'] / 60:.1f} | {'never' if reach is None else f'{reach:,}'} |")
    opsd_reach, grpo_reach = tokens_to_reach(runs["OPSD"], grpo_best), tokens_to_reach(grpo, grpo_best)
    if opsd_reach is None:
        lines += ["", f"OPSD never reached GRPO's best held-out accuracy ({grpo_best:.1%}) within the budget."]
    elif opsd_reach == 0:
        lines += ["", f"GRPO's best ({grpo_best:.1%}) is no better than the base model: no ratio to report."]
    else:
        lines += ["", f"To reach GRPO's best held-out accuracy ({grpo_best:.1%}), OPSD generated {opsd_reach:,} "
                      f"tokens and GRPO {grpo_reach:,}: {grpo_reach / opsd_reach:.1f}x fewer for OPSD."]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nwrote {out / 'points.jsonl'}, {out / 'compare.png'}, {out / 'compare.md'}")


if __name__ == "__main__":
    main()
