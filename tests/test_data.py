"""The built-in task, the tokenizer, the two prompts, local data files, and answer grading."""

import json

import pytest

from data import Example, builtin_examples, char_tokenizer, encode, load_examples, student_prompt, teacher_prompt
from evaluate import extract_answer, is_equivalent


def test_builtin_task_is_deterministic_with_disjoint_splits():
    train, test = builtin_examples("train", 3000), builtin_examples("test", 500)
    assert builtin_examples("test", 500) == test
    calculation = lambda ex: ex.solution.split(".")[0]  # noqa: E731 "11+48=59, 59-55=4"
    assert not {calculation(ex) for ex in train} & {calculation(ex) for ex in test}
    for ex in train[:200]:
        (a, r1), (r1_again, r2) = [step.split("=") for step in calculation(ex).split(", ")]
        assert eval(a) == int(r1) and eval(r1_again) == int(r2) == int(ex.answer) >= 0
        assert extract_answer(ex.solution) == ex.answer


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


def test_prompts_through_a_chat_template_keep_the_thinking_flags_apart():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% if not enable_thinking %}<think></think>{% endif %}{% endif %}")
    ex = Example("what is 2+3?", "2+3=5. \\boxed{5}", "5")
    student = student_prompt(ex, tokenizer, thinking=False)
    assert student.startswith("<|user|>Problem: what is 2+3?") and student.endswith("<|assistant|><think></think>")
    assert teacher_prompt(ex, tokenizer, thinking=True).endswith("<|assistant|>")
    assert teacher_prompt(ex, tokenizer, thinking=False).endswith("<think></think>")
    assert encode(student, tokenizer) == tokenizer(student, add_special_tokens=False).input_ids


def test_local_files_load_and_bad_columns_are_named(tmp_path):
    rows = [{"question": "1+1?", "solution": "1+1=2. \\boxed{2}"}, {"question": "2+2?", "solution": "\\boxed{4}"}]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_examples(str(good), "train") == [Example("1+1?", "1+1=2. \\boxed{2}", "2"),
                                                 Example("2+2?", "\\boxed{4}", "4")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "solution": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['question'\].*it has \['problem', 'solution'\]"):
        load_examples(str(bad), "train")
    unboxed = tmp_path / "unboxed.jsonl"
    unboxed.write_text(json.dumps({"question": "1+1?", "solution": "it is 2"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: no answer column and no \\boxed\{\} in the solution"):
        load_examples(str(unboxed), "train")
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text(json.dumps({"question": "1+1?", "solution": "it is 2", "answer": 2}) + "\n")
    assert load_examples(str(numeric), "train")[0].answer == "2"
    with pytest.raises(ValueError, match="expected 'builtin' or a"):
        load_examples("some/hub-name", "train")


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{42}", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{ {a}+{b} }", "{a}+{b}"),
    ("no box here", None),
    ("cut off \\boxed{12", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("pred, gold, same", [
    ("42", "42", True), ("42.0", "42", True), ("1,000", "1000", True), (" $7$ ", "7", True), ("-3", "-3.00", True),
    ("0.5", "0.50", True), ("41", "42", False), ("4.2", "42", False), (None, "42", False), ("x", "x", True),
    ("x", "y", False),
])
def test_is_equivalent(pred, gold, same):
    assert is_equivalent(pred, gold) is same
