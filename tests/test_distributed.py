"""torchrun on the CPU: two processes (gloo) make the same optimizer step as one process with all the rollouts,
a torchrun run resumes, and a plain `python opsd.py` run never touches torch.distributed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import opsd
from test_train import assert_same_weights, small_config, weights

ROOT = Path(__file__).resolve().parent.parent
PATCHED = ROOT / "tests" / "patched_opsd.py"


def launch(script, args, processes, succeed=True):
    """Runs script with python (1 process) or torchrun (several), on the CPU whatever the machine has."""
    command = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + [str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert (done.returncode == 0) == succeed, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def settings(model_dir, out_dir, **changes):
    cfg = small_config(model_dir, out_dir, **changes)
    return [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None and not isinstance(v, bool)] + [
        f"--{'' if v else 'no-'}{k}" for k, v in vars(cfg).items() if isinstance(v, bool)]


def steps_logged(out_dir):
    return [r["step"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_two_processes_make_the_single_process_step(model_dir, tmp_path):
    base = dict(steps=1, batch_size=8, micro_batch_size=2, eval_every=100, eval_size=2)
    for run, processes in (("one", 1), ("two", 2)):
        launch(PATCHED, ["--fixed_rollouts", *settings(model_dir, tmp_path / run, **base)], processes)
    rows = [next(r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
            for run in ("one", "two")]
    assert rows[0]["generated"] == rows[1]["generated"] > 8 * 2  # all rollouts counted, of different lengths
    for key in ("loss", "divergence", "grad_norm", "rollout_acc", "length"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-5), key
    before = weights(model_dir)
    one, two = weights(tmp_path / "one" / "step_1"), weights(tmp_path / "two" / "step_1")
    assert any(not torch.equal(one[k], before[k]) for k in one)
    assert_same_weights(two, one, atol=1e-6)


def test_a_torchrun_run_ends_and_resumes_like_a_straight_one(model_dir, tmp_path):
    base = dict(steps=3, batch_size=4, micro_batch_size=2, eval_every=2, eval_size=2)
    launch(ROOT / "opsd.py", settings(model_dir, tmp_path / "straight", **base), 2)
    launch(PATCHED, ["--crash_after=2", *settings(model_dir, tmp_path / "resumed", **base)], 2, succeed=False)
    assert (tmp_path / "resumed" / "latest").read_text() == "step_2"
    output = launch(ROOT / "opsd.py", settings(model_dir, tmp_path / "resumed", resume=True, **base), 2)
    assert output.count("resuming from") == 1  # rank 0 alone prints and logs
    assert steps_logged(tmp_path / "resumed") == steps_logged(tmp_path / "straight") == [1, 2, 3]
    assert_same_weights(weights(tmp_path / "resumed" / "step_3"), weights(tmp_path / "straight" / "step_3"))


def test_a_single_process_never_touches_torch_distributed(model_dir, tmp_path, monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("torch.distributed was used by a single-process run")

    for name in ("init_process_group", "all_reduce", "barrier", "broadcast", "destroy_process_group"):
        monkeypatch.setattr(torch.distributed, name, touched)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    opsd.train(small_config(model_dir, tmp_path / "run", steps=1))
    assert not torch.distributed.is_initialized()


def test_a_batch_that_does_not_split_over_the_processes_is_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="batch_size=3 does not split over 2 processes"):
        opsd.train(small_config(model_dir, tmp_path / "run", batch_size=3, micro_batch_size=1))
