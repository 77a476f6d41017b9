"""The shipped tiny model and the command lines, run as a user runs them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from data import load_examples
from evaluate import evaluate
from sampling import load_model

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT):
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("task", ["builtin", "builtin_other"])
def test_the_shipped_base_models_copy_references_but_rarely_solve_alone(task, tmp_path):
    """The premise of the demo and of its other-style variant: a wide gap between the two contexts for OPSD
    to close; and both contexts write the model's own style ('a+b=r1, r1-c=r2. \\boxed{r2}'), whatever the
    style of the reference the teacher reads."""
    model, tokenizer = load_model(str(ROOT / "tiny" / ("model" if task == "builtin" else "model_other")))
    examples = load_examples(task, "test", 200)
    for with_reference, low, high in ((True, 0.8, 1.0), (False, 0.0, 0.3)):
        out = tmp_path / f"{with_reference}.jsonl"
        scores = evaluate(model, tokenizer, examples, with_reference, max_new_tokens=40, out_path=str(out))
        assert low < scores["avg@1"] < high
        texts = [json.loads(line)["completions"][0] for line in out.read_text().splitlines()]
        assert sum(re.match(r"\d+[+-]\d+=\d+, ", text) is not None for text in texts) > 0.9 * len(texts)


def test_evaluate_cli_on_a_local_model_and_file(model_dir, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": q, "solution": f"\\boxed{{{a}}}"}) + "\n"
                            for q, a in [("1+1?", 2), ("2+2?", 4), ("3+3?", 6)]))
    out = run("evaluate.py", "--model", str(model_dir), "--dataset", str(data), "--samples", "2",
              "--temperature", "1", "--max_new_tokens", "5", "--out", str(tmp_path / "rows.jsonl"))
    head, scores, tail = out.strip().splitlines()[-3:]
    assert "3 problems, question alone, 2 completion(s) each (T 1.0, top-p 1.0, top-k 0)" in head
    assert scores.startswith("avg@2 ") and " | pass@1 " in scores and " | pass@2 " in scores and " | maj@2 " in scores
    assert "truncated at the limit" in tail and str(tmp_path / "rows.jsonl") in tail
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["2", "4", "6"] and all(len(r["correct"]) == 2 for r in rows)


def test_opsd_cli_trains_and_prints_the_summary(model_dir, tmp_path):
    out = run("opsd.py", "--model", str(model_dir), "--out_dir", str(tmp_path / "run"), "--steps", "2",
              "--batch_size", "4", "--micro_batch_size", "2", "--max_new_tokens", "5", "--eval_size", "4")
    summary, curves = out.strip().splitlines()[-2:]
    assert "held-out problems (teacher with reference" in summary
    assert curves == f"curves: {tmp_path / 'run' / 'curves.png'}" and (tmp_path / "run" / "curves.png").stat().st_size
    assert (tmp_path / "run" / "latest").read_text() == "step_2"


def test_base_model_build_command_runs(tmp_path):
    out = run(str(ROOT / "tiny" / "build.py"), "--steps", "2", "--out", str(tmp_path / "model"), cwd=tmp_path)
    assert "wrote" in out and (tmp_path / "model" / "config.json").exists()


def test_divergence_benchmark_runs_and_prints_its_table():
    lines = run("benchmarks/divergence.py", "--quick").strip().splitlines()
    assert "V = 8,192" in lines[0] and "CPU threads" in lines[0]
    rows = [line for line in lines if line.startswith("cpu")]
    assert len(rows) == 2 and all(line.count(" GB ") == 3 and "| fused " in line for line in rows)


def test_sampler_benchmark_checks_the_fast_path_against_the_plain_loop():
    result = json.loads(run("benchmarks/sampler.py", "--check", "--backend", "eager").strip().splitlines()[-1])
    assert result["part"] == "check" and result["greedy_equal"] and result["seeded_reproducible"] and result["ok"]


def test_real_shape_benchmark_runs_on_a_tiny_shape():
    out = run("benchmarks/real_shape.py", "--tiny", "--steps", "2", "--reference_tokens", "100")
    assert "random weights in a tiny Qwen3 shape" in out and "LoRA r64" in out and "the divergence's fused path" in out
    assert "generated tokens/s" in out.strip().splitlines()[-2]
    split = out.strip().splitlines()[-1]  # five phases, in percent, that add up to about 100
    shares = [int(share) for share in re.findall(r"(\d+)%", split)]
    assert split.startswith("time split over all 2 steps") and len(shares) == 5 and 97 <= sum(shares) <= 103


@pytest.mark.parametrize("script, args, message", [
    ("opsd.py", ["--dataset", "no/such/file.jsonl"], "no data file 'no/such/file.jsonl': check the path"),
    ("opsd.py", ["--model", "no/such/folder"], "no folder 'no/such/folder' (and it is no hub name)"),
    ("opsd.py", ["--model", "nobody/no-such-model"], "cannot load 'nobody/no-such-model'"),
    ("evaluate.py", ["--dataset", "nobody/no-such-data"], "cannot load the data set 'nobody/no-such-data'"),
    ("evaluate.py", ["--model", "BARE"], "holds no tokenizer: save the model's there"),
    ("evaluate.py", ["--dataset", "missing.parquet"], "no data file 'missing.parquet'"),
    ("evaluate.py", ["--dataset", "ANSWERS", "--answer_column", "answer", "--with_reference"],
     "with_reference needs reference solutions"),
    ("opsd.py", ["--dataset", "MALFORMED"], "bad.jsonl: JSON parse error: Missing a name for object member. Fix"),
    ("evaluate.py", ["--dataset", "MALFORMED"], "member. Fix the file (UTF-8; JSONL: one object a line)"),
    ("evaluate.py", ["--dataset", "LATIN1"], "latin1.jsonl: 'utf-8' codec can't decode byte 0xe9"),
    ("opsd.py", ["--dataset", "EMPTY"], "empty.jsonl holds no problems: it needs a row per problem"),
])
def test_bad_input_is_one_line_that_says_what_to_do_and_writes_nothing(script, args, message, model_dir, tmp_path):
    bare = tmp_path / "bare"  # a model folder without its tokenizer
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(bare)
    work = tmp_path / "work"
    work.mkdir()
    defaults = ["--model", str(ROOT / "tiny" / "model")]
    answers = tmp_path / "answers.jsonl"  # problems with answers and no reference solutions
    answers.write_text(json.dumps({"question": "1+1?", "solution": "", "answer": "2"}) + "\n")
    files = {"MALFORMED": ("bad.jsonl", b'{"question": "1+1?", "solution": "2"}\n{"question": "2+2?", solution: "4"}\n'),
             "LATIN1": ("latin1.jsonl", '{"question": "caf\u00e9?", "solution": "2"}\n'.encode("latin-1")),
             "EMPTY": ("empty.jsonl", b"\n")}
    for name, content in files.values():
        (tmp_path / name).write_bytes(content)
    files = {key: str(tmp_path / name) for key, (name, _) in files.items()}
    args = [{"BARE": str(bare), "ANSWERS": str(answers), **files}.get(a, a) for a in args]
    done = subprocess.run([sys.executable, str(ROOT / script), *defaults, *args], cwd=work, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ") and message in done.stderr
    assert not any(work.iterdir())  # no runs/ folder, no log, no checkpoint
