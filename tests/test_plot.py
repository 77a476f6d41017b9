"""plot.py: the curves of a short training run, of a run without evaluations and of one still writing; bad
input is one line that writes nothing."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from opsd import Config, train
from plot import PANELS, plot_run

ROOT = Path(__file__).resolve().parent.parent
TEACHER_ORANGE = (1.0, 0.498, 0.055)  # matplotlib's second colour: only the teacher's accuracy is drawn in it


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's header; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def pixels_of(path, colour) -> int:
    """How many pixels of the image have about this colour."""
    from matplotlib.image import imread
    image = imread(path)[..., :3]
    return int((abs(image - colour).max(axis=-1) < 0.05).sum())


def step_row(step: int) -> dict:  # the keys train() logs for a step (a GRPO or CUDA run adds a few)
    return {"step": step, "loss": 0.3 / step, "divergence": 0.3 / step, "clipped_mass": 0.0, "rollout_acc": 0.5,
            "tokens": 860, "generated": 860, "length": 26.9, "grad_norm": 0.1, "fused": True, "seconds": 0.8,
            "tokens_per_s": 1075.0, "entropy": 1.2, "truncated": 0.1}


def test_the_curves_of_a_short_training_run(model_dir, tmp_path):
    out = tmp_path / "run"
    train(Config(model=str(model_dir), out_dir=str(out), steps=2, batch_size=4, micro_batch_size=4,
                 max_new_tokens=6, eval_every=1, eval_size=4, save_every=2, dtype="float32"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {key for _, curves in PANELS for key, _ in curves} <= set().union(*rows)  # every curve has its data
    path = plot_run(out)
    assert path == out / "curves.png"
    width, height = png_size(path)
    assert 600 <= width <= 13 * 110 and 300 <= height <= width  # at most 13 inches wide at its 110 dpi
    assert 20_000 < path.stat().st_size < 1_000_000
    assert pixels_of(path, TEACHER_ORANGE) > 50  # the teacher's accuracy is drawn


def test_a_run_without_evaluations_still_writing_and_without_some_keys(tmp_path):
    rows = [step_row(s) for s in range(1, 40)]
    del rows[-1]["clipped_mass"]  # a row of a baseline may lack a key
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "loss": 0.0'  # cut off mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    path = plot_run(tmp_path)
    width, _ = png_size(path)
    assert width <= 13 * 110 and path.stat().st_size > 20_000
    assert pixels_of(path, TEACHER_ORANGE) == 0  # no accuracy curve: there is no evaluation


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such folder"),
    (lambda d: d.mkdir(), "no metrics.jsonl in"),
    (lambda d: d.mkdir() or (d / "metrics.jsonl").write_text(""), "has no rows yet"),
    (lambda d: d.mkdir() or (d / "metrics.jsonl").write_text("not json\n{}\n"), "line 1, is not JSON"),
], ids=["no folder", "no metrics", "empty", "not json"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, setup, message):
    folder = tmp_path / "run"
    setup(folder)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises((OSError, ValueError), match=message):
        plot_run(folder)
    result = subprocess.run([sys.executable, "plot.py", str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("plot.py: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_the_command_prints_the_path_and_matplotlib_waits_until_it_draws(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "student_acc": 0.2, "teacher_acc": 0.9}) + "\n")
    result = subprocess.run([sys.executable, "plot.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == f"{tmp_path / 'curves.png'}\n"
    assert png_size(tmp_path / "curves.png")
    imports = subprocess.run([sys.executable, "-c", "import sys, plot; print('matplotlib' in sys.modules)"],
                             cwd=ROOT, capture_output=True, text=True)
    assert imports.stdout == "False\n"
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_run(tmp_path)
