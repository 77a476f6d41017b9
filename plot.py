"""A picture of a run: `plot_run(out_dir)` draws the curves of `out_dir/metrics.jsonl` (`opsd.train` writes a row
per step and a row per held-out evaluation) against the step into `out_dir/curves.png`, for a finished run or one
still writing. Left out: smoothing, several runs in one figure, anything interactive. It imports nothing of opsd's,
and matplotlib only when it draws (the Agg renderer: a notebook's plotting backend is left alone).

    python plot.py runs/opsd        # writes runs/opsd/curves.png and prints its path
"""

import json
import sys
from pathlib import Path

PANELS = [  # (title, [(key in metrics.jsonl, label)]): the keys opsd.train logs; the baselines' rows lack a few
    ("held-out accuracy", [("student_acc", "student, question alone"), ("teacher_acc", "teacher, with reference")]),
    ("loss", [("loss", None)]), ("divergence (before the clip)", [("divergence", None)]),
    ("clipped teacher mass", [("clipped_mass", None)]), ("student entropy (nats per token)", [("entropy", None)]),
    ("rollout length (tokens)", [("length", None)]), ("rollouts cut at max_new_tokens", [("truncated", None)]),
    ("tokens/s", [("tokens_per_s", None)])]


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line cut off mid-write (a run still logging) is left out."""
    lines, rows = path.read_text().splitlines(), []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}, is not JSON: not an opsd run's metrics?") from None
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def plot_run(out_dir) -> Path:
    """Draws out_dir/metrics.jsonl into out_dir/curves.png and returns that path; on an error it writes nothing."""
    out = Path(out_dir)
    if not (out / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {out}" if out.is_dir() else f"no such folder: {out}")
    rows = read_metrics(out / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{out / 'metrics.jsonl'} has no rows yet: nothing to draw")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot.py needs matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(13, 5.6), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg renderer, whatever backend pyplot uses elsewhere
    axes = figure.subplots(2, 4, sharex=True)
    for ax, (title, curves) in zip(axes.flat, PANELS):
        for key, label in curves:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if len(points) <= 20 else None)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged yet", ha="center", transform=ax.transAxes)
        elif len(curves) > 1:
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=8)
        ax.set_title(title)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    figure.suptitle(f"{out.resolve().name}: step {max(r['step'] for r in rows)}")
    figure.savefig(out / "curves.png", dpi=110)
    return out / "curves.png"


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    try:
        print(plot_run(sys.argv[1]))
    except (OSError, ValueError, ImportError) as e:  # bad input: one line, no traceback, nothing written
        sys.exit(f"plot.py: error: {e}")
