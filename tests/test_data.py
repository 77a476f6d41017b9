"""The built-in task, the tokenizer, the two prompts, hub and local data sets, fitting prompts, reading the
final answer out of a solution."""

import json

import pytest
from conftest import qwen3_tokenizer

import data
from data import (INSTRUCTION, Example, builtin_examples, char_tokenizer, encode, evaluation_prompt, extract_answer,
                  fit_prompts, load_examples, shorten_reference, student_prompt, teacher_prompt)


def test_builtin_task_is_deterministic_with_disjoint_splits():
    train, test = builtin_examples("train", 3000), builtin_examples("test", 500)
    assert builtin_examples("test", 500) == test
    calculation = lambda ex: ex.solution.split(".")[0]  # noqa: E731 "11+48=59, 59-55=4"
    assert not {calculation(ex) for ex in train} & {calculation(ex) for ex in test}
    for ex in train[:200]:
        (a, r1), (r1_again, r2) = [step.split("=") for step in calculation(ex).split(", ")]
        assert eval(a) == int(r1) and eval(r1_again) == int(r2) == int(ex.answer) >= 0
        assert extract_answer(ex.solution) == ex.answer


def test_the_other_style_variants_have_the_same_problems_and_answers():
    for split in ("train", "test"):
        own, other = builtin_examples(split, 300), load_examples("builtin_other", split, 300)
        assert [(ex.question, ex.answer) for ex in own] == [(ex.question, ex.answer) for ex in other]
        for ex in other:  # "\\boxed{4}, as 11 plus 48 is 59 and 59 minus 55 is 4."
            assert ex.solution.startswith(f"\\boxed{{{ex.answer}}}, as ") and extract_answer(ex.solution) == ex.answer
            a, word1, b, _, r1, _, r1_again, word2, c, _, r2 = ex.solution[:-1].split(", as ")[1].split()
            sign1, sign2 = ({"plus": "+", "minus": "-"}[w] for w in (word1, word2))
            assert eval(a + sign1 + b) == int(r1) == int(r1_again) and eval(r1 + sign2 + c) == int(r2) == int(ex.answer)
        working_first = load_examples("builtin_other_working_first", split, 300)
        for ex, answer_first in zip(working_first, other):  # "11 plus 48 is 59 and 59 minus 55 is 4, so \\boxed{4}."
            assert (ex.question, ex.answer) == (answer_first.question, answer_first.answer)
            working = answer_first.solution.split(", as ")[1][:-1]
            assert ex.solution == f"{working}, so \\boxed{{{ex.answer}}}." and extract_answer(ex.solution) == ex.answer


def test_char_tokenizer_round_trips_and_reloads(tmp_path):
    from transformers import AutoTokenizer
    tokenizer = char_tokenizer()
    ex = builtin_examples("train", 1)[0]
    text = teacher_prompt(ex, tokenizer) + ex.solution
    ids = encode(text, tokenizer)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) - 100  # each fixed piece of the templates is one token
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert encode(text, again) == ids and again.eos_token == "<eos>" and again.pad_token == "<pad>"


def test_prompts_without_a_chat_template():
    tokenizer = char_tokenizer()
    ex = Example("what is 2+3?", "2+3=5. \\boxed{5}", "5")
    student, teacher = student_prompt(ex, tokenizer), teacher_prompt(ex, tokenizer)
    assert student.startswith("Problem: what is 2+3?") and student.endswith("within \\boxed{}.")
    assert ex.solution not in student and ex.solution in teacher
    assert "Reference Solution Begin" in teacher and teacher.endswith("within \\boxed{}.")


def test_prompts_through_a_qwen3_chat_template_with_each_thinking_setting():
    """The official code's user messages, verbatim, written out here rather than taken from data.py."""
    tokenizer = qwen3_tokenizer()
    ex = Example("what is 2+3?", "2+3=5. \\boxed{5}", "5")
    instruction = "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    reference = ("Here is a reference solution to this problem:\n=== Reference Solution Begin ===\n2+3=5. \\boxed{5}\n"
                 "=== Reference Solution End ===\n\n\nAfter reading the reference solution above, make sure you truly "
                 "understand the reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your own "
                 "words and independent reasoning, derive the same final answer to the problem above. Think step by "
                 "step, explore different approaches, and don't be afraid to backtrack or reconsider if something "
                 "doesn't work out:\n\n")
    user, plain = "<|im_start|>user\nProblem: what is 2+3?\n\n", "<|im_start|>user\nwhat is 2+3?\n\n"
    for thinking, opening in ((False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"), (True, "<|im_start|>assistant\n")):
        assert student_prompt(ex, tokenizer, thinking) == user + instruction + opening
        assert teacher_prompt(ex, tokenizer, thinking) == user + reference + instruction + opening
        assert evaluation_prompt(ex, tokenizer, thinking) == plain + instruction + opening
    student = student_prompt(ex, tokenizer, False)
    assert encode(student, tokenizer) == tokenizer(student, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(encode(student, tokenizer))[-6:] == ["<think>", "\n", "\n", "</think>", "\n", "\n"]


ROWS = [{"problem": "1+1?", "solution": "1+1=2. \\boxed{2}"}, {"problem": "2+2?", "solution": "2+2=4. \\boxed{4}"}]
EXAMPLES = [Example("1+1?", "1+1=2. \\boxed{2}", "2"), Example("2+2?", "2+2=4. \\boxed{4}", "4")]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_local_files_load_in_every_format(tmp_path, suffix):
    import pandas
    path = tmp_path / f"data.{suffix}"
    table = pandas.DataFrame(ROWS)
    {"jsonl": lambda: table.to_json(path, orient="records", lines=True), "json": lambda: table.to_json(path, orient="records"),
     "csv": lambda: table.to_csv(path, index=False), "parquet": lambda: table.to_parquet(path)}[suffix]()
    assert load_examples(str(path), question_column="problem") == EXAMPLES
    assert load_examples(str(path), "test", n=1, question_column="problem") == EXAMPLES[:1]  # a file has one split


def test_missing_columns_and_answers_get_errors_that_name_the_fix(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['question'\]; it has \['problem', 'solution'\]\. "
                                         r"Name the right ones with --question_column"):
        load_examples(str(path))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['final'\]"):
        load_examples(str(path), question_column="problem", answer_column="final")
    unboxed = tmp_path / "unboxed.jsonl"
    unboxed.write_text(json.dumps({"question": "1+1?", "solution": "it is 2"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: no answer \(no answer column, or an empty cell\) and no final "
                                         r"answer .* set --answer_column or fix the row"):
        load_examples(str(unboxed))
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text(json.dumps({"question": "1+1?", "solution": "it is 2", "answer": 2}) + "\n")
    assert load_examples(str(numeric), answer_column="answer")[0].answer == "2"


def test_an_empty_answer_cell_or_the_solution_as_answer_column_is_never_taken_as_an_answer(tmp_path):
    """GSM8K keeps its solutions under 'answer': --answer_column answer would make a whole solution the answer.
    An empty cell (None in a JSONL, a CSV) was the answer 'None'; it is read from the solution instead."""
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    with pytest.raises(ValueError, match=r"the answer column 'answer' is the solution column: .* Leave --answer_col"):
        load_examples(str(gsm8k), solution_column="answer", answer_column="answer")
    assert load_examples(str(gsm8k), solution_column="answer")[0].answer == "2"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"question": "1+1?", "solution": s, "answer": a}) + "\n"
                             for s, a in (("\\boxed{2}", None), ("\\boxed{3}", ""), ("no box", "4"))))
    assert [ex.answer for ex in load_examples(str(empty), answer_column="answer")] == ["2", "3", "4"]
    empty.write_text(json.dumps({"question": "1+1?", "solution": "no box", "answer": None}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: no answer \(no answer column, or an empty cell\)"):
        load_examples(str(empty), answer_column="answer")


def test_folders_and_presets_go_through_load_dataset_with_their_splits(tmp_path, monkeypatch):
    """A local folder with train and test files opens as a hub data set does; a preset names its columns.
    Here the GSM8K preset points at a local copy in GSM8K's format (answers after '####')."""
    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    for split, (q, a) in (("train", ("1+1?", 2)), ("test", ("2+3?", 5))):
        (gsm8k / f"{split}.jsonl").write_text(json.dumps({"question": q, "answer": f"{q[:-1]} is {a}.\n#### {a}"}))
    monkeypatch.setitem(data.PRESETS, "gsm8k", (str(gsm8k), None, "question", "answer", None))
    assert load_examples("gsm8k", "test") == [Example("2+3?", "2+3 is 5.\n#### 5", "5")]
    assert load_examples(str(gsm8k), "train") == [Example("1+1?", "1+1 is 2.\n#### 2", "2")]  # by hub name
    with pytest.raises(ValueError, match=r"has no 'validation' split; it has \['train', 'test'\]"):
        load_examples("gsm8k", "validation")
    one_split = tmp_path / "aime"
    one_split.mkdir()
    (one_split / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert load_examples(str(one_split), "test", question_column="problem") == EXAMPLES  # its only split
    assert data.PRESETS["openthoughts"][:4] == ("siyanzhao/Openthoughts_math_30k_opsd", None, "problem", "solution")


def test_a_long_reference_is_cut_in_its_middle_and_what_cannot_fit_is_skipped(capsys):
    tokenizer = char_tokenizer()
    solution = "first line. " + "filler " * 40 + "last line. \\boxed{7}"
    long = Example("what is 3+4?", solution, "7")
    full = len(encode(teacher_prompt(long, tokenizer), tokenizer))
    short = shorten_reference(long, tokenizer, full - 100)
    teacher = teacher_prompt(short, tokenizer)
    assert len(encode(teacher, tokenizer)) <= full - 100
    assert "Problem: what is 3+4?" in teacher and teacher.endswith(INSTRUCTION.format())
    assert short.solution.startswith("first line.") and short.solution.endswith("\\boxed{7}")
    assert "tokens left out ...]" in short.solution and short.question == long.question
    assert shorten_reference(long, tokenizer, full) is long
    assert shorten_reference(long, tokenizer, 30) is None  # not even the question and instructions fit
    fitted = fit_prompts([long, Example("1+1?", "\\boxed{2}", "2")] * 2, tokenizer, full - 100)
    assert len(fitted) == 4 and fitted[0] == short
    assert "2 of 4 examples had their reference solution shortened and 0 were skipped" in capsys.readouterr().out
    with_template = qwen3_tokenizer()
    limit = len(encode(teacher_prompt(long, with_template), with_template)) - 50
    short = shorten_reference(long, with_template, limit)
    assert len(encode(teacher_prompt(short, with_template), with_template)) <= limit
    assert teacher_prompt(short, with_template).startswith("<|im_start|>user\nProblem: what is 3+4?")


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{42}", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # several boxes: the last
    ("\\boxed{ {a}+{b} }", "{a}+{b}"),  # nested braces
    ("\\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}"),
    ("first \\boxed{3}, finally \\fbox{4}", "4"),
    ("no box here", None),
    ("cut off \\boxed{12", None),  # a completion truncated inside its box has no answer
    ("\\boxed{7} and then cut off \\boxed{\\frac{1}{", None),
    ("48/2 = 24 clips.\n#### 24", "24"),  # GSM8K
    ("So the answer is 17.", "17"),
    ("The final answer is: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("this answer is that 5 is prime", None),  # "the answer is" or "the final answer is" only
    ("The answer is 6.\nOur answer is 7.", "6"),
    ("#### ", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer
