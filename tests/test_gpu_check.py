"""benchmarks/gpu_check.sh in its CPU mode: every part of the GPU check runs at tiny shapes, so that on the first
GPU at hand only the GPU itself can fail. (About a minute on 2 CPU cores.)"""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_every_part_in_its_cpu_mode(tmp_path):
    results = tmp_path / "results.jsonl"
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", str(results)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert not [r for r in rows if "failed" in r], [r for r in rows if "failed" in r]
    parts = {r["part"] for r in rows}
    assert parts == {"preflight", "check", "rollouts", "profile", "step_progress", "step", "divergence"}, parts
    methods = {r["method"] for r in rows if r["part"] == "rollouts" and "tokens_per_s" in r}
    assert len(methods) == 5 and any(m.startswith("fast path") for m in methods), methods
    assert {r["variant"] for r in rows if r["part"] == "divergence"} == {"eager", "plain", "fused"}
    verdicts = done.stdout.split("=== goals\n")[1].splitlines()
    assert len(verdicts) == 4 and all(line.startswith("PASS ") for line in verdicts), verdicts


def test_the_gpu_check_refuses_a_transformers_that_ignores_the_cache(tmp_path):
    fake = tmp_path / "site" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '5.17.0'\n")
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", str(tmp_path / "r.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})  # an old transformers first
    assert done.returncode != 0 and "transformers 5.17.0 ignores cache=" in done.stderr
    assert "=== correctness" not in done.stdout

