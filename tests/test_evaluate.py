"""Grading as mathematics (with and without math_verify), pass@k, avg@k and maj@k, and the
evaluation command line."""

import itertools
import json
import math
import re
from pathlib import Path

import pytest

import evaluate
from data import builtin_examples, extract_answer
from evaluate import grade, is_equivalent, pass_at_k, summarize, to_number
from sampling import load_model


PAIRS = [  # (prediction, gold, equal)
    ("42", "42", True), ("42.0", "42", True), ("0.50", "0.5", True), ("41", "42", False), ("4.2", "42", False),
    ("1,000", "1000", True), ("1,234,567.5", "1234567.5", True), ("1,001", "1000", False),  # thousands
    ("-3", "-3.00", True), ("- 3", "-3", True), ("+7", "7", True), ("-7", "7", False),  # signs
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "3/4", True), ("\\tfrac12", "0.5", True),  # fractions
    ("\\frac{2}{4}", "\\frac{1}{2}", True), ("0.33", "\\frac{1}{3}", False), ("1/3", "\\frac{1}{3}", True),
    ("-\\frac{1}{2}", "-0.5", True), ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("50\\%", "50", True), ("12.5%", "12.5", True),  # percentages
    ("x = 5", "5", True), ("k=-2", "-2", True), ("x = 5", "6", False),  # a leading 'x ='
    ("5\\text{ cm}", "5", True), ("5\\text{ apples}", "5", True), ("10\\mathrm{~m}", "10", True),  # units
    ("5 cm", "5", True), ("12 square feet", "12", True), ("5 or more", "5", False),
    ("\\$18.90", "18.90", True), ("\\$18.90", "18.9", True), ("10_2", "102", False),  # a dollar sign, not 10_2
    ("1{,}000", "1000", True), ("1\\frac12", "1.5", True), ("-2\\frac{1}{4}", "-2.25", True),  # 1{,}000, mixed
    ("1\\frac{1}{2}", "\\frac{3}{2}", True), ("1\\frac{1}{2}", "\\frac{1}{2}", False), ("+1\\frac12", "0.5", False),
    ("(1\\frac12, 2)", "(1.5,2)", True), ("1e400", "1e500", False),  # mixed numbers anywhere; no infinity
    ("30^\\circ", "30", True), ("45^{\\circ}", "45", True), ("90°", "90", True), ("\\text{(B)}", "B", True),
    ("\\left( 1, \\frac{1}{2} \\right)", "(1,0.5)", True), ("(1, 2)", "(2, 1)", False),  # tuples
    ("(1,2,3)", "(1,2)", False), ("[0, 1)", "[0,1)", True), ("[0,1)", "(0,1)", False),  # intervals
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt2", "1.41421356", True), ("\\sqrt{3}", "\\sqrt{2}", False),  # surds
    ("\\frac{9\\sqrt{23}}{23}", "\\frac{9}{\\sqrt{23}}", True), ("\\frac{\\sqrt{3}}{2}", "0.8660254", True),
    ("3\\pi", "9.42477796", True), ("\\pi/2", "\\frac{\\pi}{2}", True), ("2\\pi", "\\pi", False),  # pi
    ("10^{3}", "1000", True), ("2^{10}", "1024", True), ("$42$", "42", True), (" 7 ", "7", True),  # $ and spaces
    ("123456789012345678901", "123456789012345678900", False),  # exact integers, however large
    ("x", "x", True), ("x", "y", False), (None, "42", False), ("", "42", False),
]


@pytest.fixture(params=["rules", "math_verify"])
def grader(request, monkeypatch):
    """The built-in rules alone, and with math_verify installed (skipped where it is not)."""
    if request.param == "rules":
        monkeypatch.setattr(evaluate, "math_verify", None)
    else:
        monkeypatch.setattr(evaluate, "math_verify", pytest.importorskip("math_verify"))
    return is_equivalent


def test_answer_pairs_are_graded_as_mathematics(grader):
    assert len(PAIRS) >= 40
    wrong = [(pred, gold, same) for pred, gold, same in PAIRS if grader(pred, gold) is not same]
    assert not wrong


def test_the_fast_path_reads_plain_numbers_only():
    assert to_number("1e3") == 1000.0 and to_number("-.5") == -0.5
    assert to_number("10_2") is None and to_number("inf") is None and to_number("nan") is None
    assert to_number("-inf") is None and to_number("1_000") is None


def test_strict_extraction_reads_the_last_boxed_only():
    assert extract_answer("\\fbox{3}", strict=True) is None and extract_answer("\\fbox{3}") == "3"
    assert extract_answer("#### 24", strict=True) is None and extract_answer("so the answer is 5", strict=True) is None
    assert extract_answer("\\boxed{1} or \\boxed{2}", strict=True) == "2"


def test_math_verify_is_asked_only_when_the_rules_cannot_decide(monkeypatch):
    pytest.importorskip("math_verify")
    assert is_equivalent("x + 1", "1 + x")  # symbolic: math_verify
    monkeypatch.setattr(evaluate, "math_verify", None)
    assert not is_equivalent("x + 1", "1 + x")  # a gap of the rules alone (documented)


@pytest.mark.parametrize("n, k", [(n, k) for n in range(1, 7) for k in range(1, n + 1)])
def test_pass_at_k_matches_brute_force_enumeration(n, k):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert math.isclose(pass_at_k(n, c, k), sum(map(any, subsets)) / len(subsets), abs_tol=1e-12)


def test_avg_pass_and_maj_on_hand_made_completions():
    rows = []
    for completions, answer in [
        (["\\boxed{4}", "\\boxed{4.0}", "\\boxed{5}", "no answer"], "4"),  # 2 of 4 right; majority 4
        (["\\boxed{1/2}", "\\boxed{7}", "\\boxed{0.5}", "\\boxed{7}"], "7"),  # tie 2-2: the first group, 1/2
        (["\\boxed{3}", "\\boxed{3}", "\\boxed{3}", "\\boxed{3}"], "2"),  # all wrong
    ]:
        rows.append({**grade(completions, answer), "lengths": [10, 20, 30, 40], "truncated": [False] * 3 + [True]})
    assert rows[0]["extracted"] == ["4", "4.0", "5", None] and rows[0]["correct"] == [True, True, False, False]
    assert rows[0]["majority"] == "4" and rows[1]["majority"] == "1/2" and not rows[1]["majority_correct"]
    scores = summarize(rows, 4)
    assert scores["avg@4"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert scores["pass@1"] == pytest.approx(scores["avg@4"])  # pass@1 is the mean accuracy
    assert scores["pass@2"] == pytest.approx((1 - 1 / 6 + 1 - 1 / 6 + 0) / 3)  # 1 - C(2,2)/C(4,2)
    assert scores["pass@4"] == pytest.approx(2 / 3) and scores["maj@4"] == pytest.approx(1 / 3)
    assert scores["mean_length"] == 25 and scores["truncated"] == 0.25
    # the avg@1 of each sample: 1/3, 2/3, 0, 1/3; each problem's accuracy: 1/2, 1/2, 0
    assert scores["se_samples"] == pytest.approx(math.sqrt(2 / 27) / 2)
    assert scores["se_problems"] == pytest.approx(1 / 6)
    assert list(scores) == ["problems", "samples", "avg@4", "se_samples", "se_problems", "pass@1", "pass@2", "pass@4",
                            "maj@4", "mean_length", "truncated"]
    assert summarize(rows[:1], 1)["se_samples"] is None and summarize(rows[:1], 1)["se_problems"] is None


def test_evaluate_writes_a_row_per_problem_and_refuses_missing_references(model_dir, tmp_path):
    from data import Example
    from sampling import load_model
    model, tokenizer = load_model(str(model_dir))
    examples = [Example("1+1?", "1+1=2. \\boxed{2}", "2"), Example("2+3?", "", "5")]
    out = tmp_path / "rows.jsonl"
    scores = evaluate.evaluate(model, tokenizer, examples, samples=3, temperature=1.0, max_new_tokens=6, out_path=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["1+1?", "2+3?"] and all(len(r["completions"]) == 3 for r in rows)
    assert rows[0]["prompt"].startswith("Problem: 1+1?") and all(r["lengths"] for r in rows)
    assert scores["problems"] == 2 and scores["samples"] == 3 and scores["truncated"] > 0.5  # a random model
    with pytest.raises(ValueError, match="with_reference needs reference solutions"):
        evaluate.evaluate(model, tokenizer, examples, with_reference=True)


def test_the_papers_benchmarks_are_graded_with_its_prompt_and_its_last_box_only(model_dir, monkeypatch, tmp_path):
    from data import Example, encode
    from sampling import load_model
    model, tokenizer = load_model(str(model_dir))
    examples = [Example("1+1?", "", "2")]
    completion = encode("so #### 2", tokenizer)
    monkeypatch.setattr(evaluate, "sample", lambda model, prompts, *args: [completion] * len(prompts))
    assert evaluate.evaluate(model, tokenizer, examples)["avg@1"] == 1  # '####' is read as the answer
    out = tmp_path / "rows.jsonl"
    assert evaluate.evaluate(model, tokenizer, examples, paper=True, out_path=out)["avg@1"] == 0  # not a \boxed{}
    assert json.loads(out.read_text())["prompt"] == "1+1?\n\nPlease reason step by step, and put your final answer " \
                                                    "within \\boxed{}."


def test_the_cli_evaluates_a_papers_benchmark_as_the_paper_does(model_dir, tmp_path, monkeypatch, capsys):
    import sys

    import data
    folder = tmp_path / "aime"  # a local stand-in for the aime24 preset's hub data set
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    monkeypatch.setitem(data.PRESETS, "aime24", (str(folder), None, "problem", None, "answer"))
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", str(model_dir), "--dataset", "aime24",
                                      "--max_new_tokens", "4", "--out", str(out)])
    evaluate.main()
    assert "1 problems, the paper's prompt" in capsys.readouterr().out
    assert json.loads(out.read_text())["prompt"].startswith("1+1?\n\nPlease reason step by step")


def test_fast_sampling_grades_the_same_completions_as_the_plain_loop(tmp_path, compilations):
    """On the shipped tiny model, whose rows end at different steps: three batches, one compilation."""
    model, tokenizer = load_model(str(Path(__file__).parent.parent / "tiny" / "model"), "float32")
    examples = builtin_examples("test", 24)
    for fast in (False, True):
        evaluate.evaluate(model, tokenizer, examples, max_new_tokens=40, batch_size=8, fast=fast,
                          out_path=str(tmp_path / f"{fast}.jsonl"))
    plain, fast = ([json.loads(line) for line in (tmp_path / f"{f}.jsonl").read_text().splitlines()]
                   for f in (False, True))
    assert fast == plain and len({row["lengths"][0] for row in plain}) > 1
    assert compilations[0] == 1


def test_the_cli_evaluates_a_run_as_it_trained(qwen3_dir, tmp_path, monkeypatch, capsys):
    """A run folder (or its `latest`) is its newest checkpoint; the teacher's context gets the teacher's
    thinking flag (on), the question alone the student's (off), as in training; the default output is named
    by model and data set, and the scores, standard errors included, lie beside it."""
    import shutil
    import sys
    shutil.copytree(qwen3_dir, tmp_path / "run" / "step_3")
    (tmp_path / "run" / "latest").write_text("step_3")
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "solution": f"\\boxed{{{i + 1}}}"}) + "\n"
                            for i in range(3)))
    monkeypatch.chdir(tmp_path)
    for model, reference in (("run", []), ("run/latest", ["--with_reference"])):
        monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", model, "--dataset", str(data), "--samples", "2",
                                          "--temperature", "1", "--max_new_tokens", "3", *reference])
        evaluate.main()
    printed = capsys.readouterr().out
    assert "run/step_3 on " in printed and "thinking off" in printed and "thinking on" in printed
    assert re.search(r"avg@2 \d+\.\d% \(standard error \d+\.\d% over the 2 samples, \d+\.\d% over the problems\)",
                     printed)
    alone, teacher = (tmp_path / "runs" / "eval" / f"run_step_3_test{suffix}.jsonl"
                      for suffix in ("", "_with_reference"))
    assert json.loads(alone.read_text().splitlines()[0])["prompt"].endswith("<think>\n\n</think>\n\n")  # off
    assert json.loads(teacher.read_text().splitlines()[0])["prompt"].endswith("<|im_start|>assistant\n")  # on
    scores = json.loads(alone.with_suffix(".scores.json").read_text())
    assert scores["problems"] == 3 and scores["se_problems"] is not None and "se_samples" in scores


def test_rows_are_written_as_they_are_graded(model_dir, tmp_path, monkeypatch):
    """A run stopped in its second batch keeps the first batch's rows."""
    from data import Example
    from sampling import load_model
    model, tokenizer = load_model(str(model_dir))
    calls, original = [], evaluate.sample

    def stop_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "sample", stop_at_the_second_batch)
    out = tmp_path / "rows.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(model, tokenizer, [Example(f"{i}+1?", "", str(i + 1)) for i in range(4)], samples=2,
                          batch_size=4, max_new_tokens=3, out_path=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["completions"]) == 2 for r in rows)  # 2 problems x 2 samples a batch


def test_the_default_output_is_named_after_the_model_folder_and_the_threads_are_said(qwen3_dir, tmp_path, monkeypatch,
                                                                                    capsys):
    import shutil
    import sys
    shutil.copytree(qwen3_dir, tmp_path / "models" / "mine")
    (tmp_path / "work").mkdir()
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "solution": "\\boxed{2}"}) + "\n")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", "../models/mine", "--dataset", str(data),
                                      "--max_new_tokens", "2"])
    evaluate.main()
    assert (tmp_path / "work" / "runs" / "eval" / "models_mine_test.jsonl").is_file()  # not '.._mine'
    assert re.search(r"\d CPU threads \(\d+ cores, load average \d+\.\d before this started\)", capsys.readouterr().out)
