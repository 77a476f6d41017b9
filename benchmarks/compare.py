"""OPSD against SFT and GRPO on the built-in task and on its other-style variant, three seeds each, and the
paper's ablations, in miniature. Every run goes through the same loop (opsd.train) with the same budget: the
same number of optimizer steps of 32 sequences each (OPSD: 32 problems x 1 rollout; GRPO: 4 problems x 8
rollouts; SFT: 32 reference solutions, nothing generated). The two tasks (data.py):
  builtin        the references are in the base model's own style (tiny/model was trained on them)
  builtin_other  the same problems, references "by another model": the answer first, the working after, in
                 words; its base model (tiny/model_other) answers in its own style and reads the other one
It records the held-out student accuracy (greedy, 200 problems) against optimizer steps, generated tokens and
training minutes, and writes every point (points.jsonl), a plot (compare.png) and Markdown tables with the
mean and spread over seeds (compare.md). Runs go two at a time, one CPU thread each (on 2 cores that does
about 1.3x the work of one run on two threads; a run's minutes are then its own, on one thread).

    python benchmarks/compare.py               # 18 runs: about 40 minutes on 2 CPU cores
    python benchmarks/compare.py --ablations   # the paper's ablations and LoRA, builtin, seed 0 (about 25 minutes)
    python benchmarks/compare.py --controls --eval_size 500   # the tutorial's controls (CONTROLS, PAIRS), six seeds
    python benchmarks/compare.py --quick       # every run for 2 steps: checks the script
"""

import argparse
import io
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from opsd import Config, train  # noqa: E402

TASKS = {"builtin": str(ROOT / "tiny" / "model"), "builtin_other": str(ROOT / "tiny" / "model_other"),
         # the same base model: for SFT, which reads no teacher, the answer's place is the one difference
         "builtin_other_working_first": str(ROOT / "tiny" / "model_other")}
METHODS = {  # name: what differs from opsd.Config's defaults (JSD 0.5, fixed teacher, 32 problems, lr 1e-3)
    "OPSD": {},
    "SFT": {"method": "sft"},
    # GRPO's lr is its own: at OPSD's 1e-3 it collapsed within 20 steps (every group all wrong, no gradient
    # left), at 3e-4 it fell to 4-15%; 1e-4 was the best of the three (measured on 300-step runs).
    "GRPO (G=8)": {"method": "grpo", "group_size": 8, "batch_size": 4, "lr": 1e-4},
}
CONTROLS = {  # task: the runs; each pair below differs in one thing that the tutorial argues (PAIRS)
    "builtin": {"OPSD": {}, "OPSD, current weights as teacher": {"teacher_decay": 0.0},
                "OPSD, off-policy: the initial student's rollouts": {"off_policy": True}, "SFT": {"method": "sft"}},
    # room for a whole reference of the other style (at most 53 tokens with the EOS), which SFT learns to write
    "builtin_other": {"OPSD": {"max_new_tokens": 64}, "SFT": {"method": "sft", "max_new_tokens": 64}},
    # tiny/model_other's teacher cannot read this style (0.5% right with it): SFT alone, which needs no teacher
    "builtin_other_working_first": {"SFT": {"method": "sft", "max_new_tokens": 64}},
}
PAIRS = [  # (what it measures, (task, run), (task, run)): the first minus the second, seed by seed
    ("a fixed teacher, not the current weights", ("builtin", "OPSD"), ("builtin", "OPSD, current weights as teacher")),
    ("on-policy rollouts, not the initial student's", ("builtin", "OPSD"),
     ("builtin", "OPSD, off-policy: the initial student's rollouts")),
    ("OPSD, not SFT, on references in the student's own style", ("builtin", "OPSD"), ("builtin", "SFT")),
    ("OPSD, not SFT, on other-style references, answer first", ("builtin_other", "OPSD"), ("builtin_other", "SFT")),
    ("SFT on other-style references: working first, not answer first", ("builtin_other_working_first", "SFT"),
     ("builtin_other", "SFT")),
]
ABLATIONS = {
    "OPSD": {},
    "OPSD, forward KL": {"beta": 0.0},
    "OPSD, reverse KL": {"beta": 1.0},
    "OPSD, forward KL, clip 0.05": {"beta": 0.0, "clip": 0.05},
    "OPSD, current weights as teacher": {"teacher_decay": 0.0},
    "OPSD, EMA teacher 0.99": {"teacher_decay": 0.99},
    # the paper's v3 objective where the student starts close to its teacher: a LoRA on the base model
    **{f"OPSD, LoRA r8, lr {lr}{name}": {"lora_rank": 8, "lora_alpha": 16.0, "lr": float(lr), **changes}
       for lr in ("1e-3", "1e-4")
       for name, changes in (("", {}), (", forward KL, clip 0.05", {"beta": 0.0, "clip": 0.05}))},
}


def run(task: str, name: str, changes: dict, seed: int, args) -> list[dict]:
    """Trains one run, in a worker process of its own on one thread, and returns its evaluations, each with the
    generated tokens and training seconds so far."""
    torch.set_num_threads(1)
    out_dir = Path(args.out) / task / "".join(c for c in name.replace(" ", "_") if c.isalnum() or c in "_.") / str(seed)
    metrics = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not (args.reuse and rows and rows[-1].get("step") == args.steps and "student_acc" in rows[-1]):
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = Config(model=TASKS[task], dataset=task, out_dir=str(out_dir), steps=args.steps, seed=seed,
                     eval_every=args.eval_every, eval_size=args.eval_size, save_every=args.steps, **changes)
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # its table and progress bar
            train(cfg)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    points, tokens, seconds = [], 0, 0.0
    for row in rows:
        if "loss" in row:
            tokens, seconds = tokens + row["generated"], seconds + row["seconds"]
        else:
            points.append({"task": task, "run": name, "seed": seed, "step": row["step"], "generated_tokens": tokens,
                           "seconds": seconds, "student_acc": row["student_acc"], "teacher_acc": row["teacher_acc"]})
    return points


def spread(values: list[float]) -> str:
    """'mean' for one value, 'mean ± standard deviation' for several, in percent."""
    mean = statistics.mean(values)
    return f"{mean:.1%}" if len(values) == 1 else f"{mean:.1%} ± {statistics.stdev(values):.1%}"


def table(points: list[dict], task: str) -> list[str]:
    """One row per method: held-out accuracy at every evaluated step (mean ± sd over seeds), generated
    tokens and training minutes (means)."""
    runs = {p["run"]: None for p in points if p["task"] == task}
    steps = sorted({p["step"] for p in points if p["task"] == task})
    lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " | generated tokens | training minutes |",
             "|---|" + "---|" * (len(steps) + 2)]
    for name in runs:
        mine = [p for p in points if p["task"] == task and p["run"] == name]
        last = [p for p in mine if p["step"] == steps[-1]]
        lines.append(f"| {name} | " + " | ".join(spread([p["student_acc"] for p in mine if p["step"] == s])
                                                 for s in steps)
                     + f" | {statistics.mean(p['generated_tokens'] for p in last):,.0f} | "
                     f"{statistics.mean(p['seconds'] for p in last) / 60:.1f} |")
    return lines


def differences(points: list[dict], step: int) -> list[str]:
    """PAIRS at `step`: the difference of held-out student accuracy, seed by seed (the same problems, held-out
    set and sampling noise), and its mean ± the standard error over seeds."""
    acc = {(p["task"], p["run"], p["seed"]): p["student_acc"] for p in points if p["step"] == step}
    lines = [f"| at step {step} | first minus second, per seed | mean ± standard error |", "|---|---|---|"]
    for what, first, second in PAIRS:
        diffs = [acc[(*first, seed)] - acc[(*second, seed)] for (task, run, seed) in acc
                 if (task, run) == first and (*second, seed) in acc]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        lines.append(f"| {what} | {', '.join(f'{d:+.1%}' for d in diffs)} | {statistics.mean(diffs):+.1%} ± {se:.1%} |")
    return lines


def plot(points: list[dict], tasks: list[str], path: Path, title: str):
    """Held-out accuracy against optimizer steps, one panel per task: the mean over seeds as a line, the
    lowest and highest seed as a band."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        runs = list({p["run"]: None for p in points if p["task"] == task})
        for color, name in enumerate(runs):
            mine = [p for p in points if p["task"] == task and p["run"] == name]
            steps = sorted({p["step"] for p in mine})
            by_step = [[p["student_acc"] for p in mine if p["step"] == s] for s in steps]
            ax.plot(steps, [statistics.mean(v) for v in by_step], marker="o", color=f"C{color}", label=name)
            ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=f"C{color}", alpha=0.2)
        ax.set(title=task, xlabel="optimizer step", ylabel="held-out student accuracy (greedy)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--eval_size", type=int, default=200, help="held-out problems per evaluation (greedy)")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per run (default 3; --controls: 6; --ablations: 1)")
    parser.add_argument("--ablations", action="store_true", help="the ablations on builtin instead")
    parser.add_argument("--controls", action="store_true", help="the tutorial's controls instead (CONTROLS, PAIRS)")
    parser.add_argument("--out", default="", help="runs, points.jsonl, compare.png, compare.md (default: "
                        "runs/compare, or runs/ablations)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one CPU thread each")
    parser.add_argument("--only", default="", help="only the runs whose name contains this text")
    parser.add_argument("--reuse", action="store_true", help="keep the runs that a stopped run of the same command "
                        "finished (their metrics.jsonl ends with the last evaluation); run the others")
    parser.add_argument("--quick", action="store_true", help="2 steps per run, 4 held-out problems")
    args = parser.parse_args()
    mode = "ablations" if args.ablations else "controls" if args.controls else "compare"
    args.out = args.out or f"runs/{mode}"
    if args.quick:
        args.steps, args.eval_every, args.eval_size = 2, 2, 4
    seeds = range(1 if args.ablations else args.seeds or (6 if args.controls else 3))
    plan = {"ablations": {"builtin": ABLATIONS}, "controls": CONTROLS,
            "compare": {"builtin": METHODS, "builtin_other": METHODS}}[mode]
    plan = {task: {name: c for name, c in runs.items() if args.only in name} for task, runs in plan.items()}
    tasks = [task for task, runs in plan.items() if runs]
    started, points = time.time(), []
    jobs = [(task, name, changes, seed, args) for task in tasks for name, changes in plan[task].items() for seed in seeds]
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for (task, name, _, seed, _), mine in zip(jobs, pool.map(run, *zip(*jobs))):
            points += mine
            print(f"{task:13} {name:45} seed {seed}: student {mine[0]['student_acc']:6.1%} -> "
                  f"{mine[-1]['student_acc']:6.1%}, {mine[-1]['generated_tokens']:>9,} tokens generated, "
                  f"{mine[-1]['seconds'] / 60:4.1f} min", flush=True)
    out = Path(args.out)
    (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    plot(points, tasks, out / "compare.png", f"{args.steps} steps of 32 sequences each, {len(seeds)} seed(s): "
         "mean, and the lowest and highest seed")
    lines = [f"`python benchmarks/compare.py{'' if mode == 'compare' else ' --' + mode}`: {args.steps} steps per "
             f"run, {len(seeds)} seed(s), {args.eval_size} held-out problems, {platform.machine()}, "
             f"{args.workers} runs at a time on {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}, {(time.time() - started) / 60:.0f} min in all."]
    for task in tasks:
        first = next(iter(plan[task]))  # every run of a task starts from the same base model
        teacher = [p["teacher_acc"] for p in points if p["task"] == task and p["step"] == 0 and p["run"] == first]
        lines += ["", f"**{task}** (held-out student accuracy, mean ± sd over seeds; the teacher with the "
                      f"reference at step 0: {spread(teacher)})", ""] + table(points, task)
    if mode == "controls" and not args.only:
        lines += ["", "**The controls**, each the first run minus the second:", ""] + differences(points, args.steps)
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nwrote {out / 'points.jsonl'}, {out / 'compare.png'}, {out / 'compare.md'}")


if __name__ == "__main__":
    main()
