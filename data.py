"""data.py: the examples OPSD learns from, and the two prompts that turn one model into student and teacher.

Owns: the `Example` record, the built-in offline task (two-step arithmetic word problems with a worked
solution ending in \\boxed{answer}), loading examples from a local JSON/JSONL/CSV/parquet file, the
character tokenizer of the tiny model, and the paper's student and teacher prompts.
Leaves out: hub data sets and their column presets, prompt truncation (both come with real models).

    python data.py      # prints a few built-in problems with both prompts
"""

import random
import re
import zlib
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


@dataclass
class Example:
    question: str  # the problem x, all the student sees
    solution: str  # the reference solution y*, which only the teacher sees
    answer: str  # the final answer, for grading


# ---------------------------------------------------------------------------------------------------------
# The built-in task. "joe has 11 eggs, gets 48 more, then gives away 55. how many eggs now?" is solved by
# "11+48=59, 59-55=4. \boxed{4}". A tiny model that has seen such solutions copies one easily when it sits
# in its context, but must do two 2-digit sums in its head when it does not: the gap OPSD closes.

NAMES = ["ann", "ben", "eva", "joe", "kim", "leo", "mia", "sam", "tom", "zoe"]
ITEMS = ["apples", "books", "cards", "coins", "eggs", "pens", "shells", "stamps"]
MORE = ["gets {} more", "finds {} more", "buys {} more"]
LESS = ["gives away {}", "loses {}", "sells {}"]


def builtin_examples(split: str, n: int, seed: int = 0) -> list[Example]:
    """n problems of the built-in task. The split is decided by a hash of the arithmetic alone, so no
    calculation of the 'test' split ever appears in 'train', whatever the names and the seeds."""
    rng, examples = random.Random(seed), []
    while len(examples) < n:
        a, b, c = (rng.randint(10, 99) for _ in range(3))
        sign1, sign2 = rng.choice("+-"), rng.choice("+-")
        r1 = a + b if sign1 == "+" else a - b
        r2 = r1 + c if sign2 == "+" else r1 - c
        in_test = zlib.crc32(f"{a}{sign1}{b}{sign2}{c}".encode()) % 5 == 0  # a fifth of all calculations
        if r1 < 0 or r2 < 0 or in_test != (split == "test"):
            continue
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        step1 = rng.choice(MORE if sign1 == "+" else LESS).format(b)
        step2 = rng.choice(MORE if sign2 == "+" else LESS).format(c)
        examples.append(Example(
            question=f"{name} has {a} {item}, {step1}, then {step2}. how many {item} now?",
            solution=f"{a}{sign1}{b}={r1}, {r1}{sign2}{c}={r2}. \\boxed{{{r2}}}",
            answer=str(r2)))
    return examples


def load_examples(source: str, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """Examples from the built-in task ('builtin') or from a local file with the columns question and
    solution (answer is optional: without it, the answer is the last \\boxed{} of the solution)."""
    if source == "builtin":
        return builtin_examples(split, n or (20_000 if split == "train" else 500), seed)
    import datasets  # imported here: the built-in task does not need it

    kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(source.rsplit(".", 1)[-1])
    if kind is None:
        raise ValueError(f"dataset {source!r}: expected 'builtin' or a .jsonl/.json/.csv/.parquet file")
    rows = datasets.load_dataset(kind, data_files=source, split="train")
    missing = {"question", "solution"} - set(rows.column_names)
    if missing:
        raise ValueError(f"dataset {source!r} lacks the column(s) {sorted(missing)}; it has "
                         f"{rows.column_names}. Rename the columns to question, solution (and optionally answer).")
    from evaluate import extract_answer

    examples = []
    for i, r in enumerate(rows):
        answer = str(r["answer"]) if r.get("answer") is not None else extract_answer(r["solution"])
        if answer is None:
            raise ValueError(f"dataset {source!r}, row {i}: no answer column and no \\boxed{{}} in the solution")
        examples.append(Example(r["question"], r["solution"], answer))
    return examples[:n] if n else examples


# ---------------------------------------------------------------------------------------------------------
# The two contexts (PAPER.md, "Prompts"). The student sees the problem; the teacher sees the problem and a
# reference solution, with a request to derive the answer itself rather than copy it.

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{{}}."  # a format string
STUDENT = "Problem: {question}\n\n" + INSTRUCTION
TEACHER = ("Problem: {question}\n\nHere is a reference solution to this problem:\n"
           "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
           "Read the reference solution until you understand it, then solve the problem yourself, in your own "
           "words, and reach the same final answer. Do not copy it.\n" + INSTRUCTION)


def student_prompt(example: Example, tokenizer, thinking: bool = False) -> str:
    """The student's context: the problem alone."""
    return render(STUDENT.format(question=example.question), tokenizer, thinking)


def teacher_prompt(example: Example, tokenizer, thinking: bool = True) -> str:
    """The teacher's context: the problem and the privileged reference solution."""
    return render(TEACHER.format(question=example.question, solution=example.solution), tokenizer, thinking)


def render(message: str, tokenizer, thinking: bool) -> str:
    """A user turn through the tokenizer's chat template, or the plain message when it has none. The
    student and teacher thinking flags differ in the paper's code, which makes the first completion
    tokens disagree for reasons unrelated to the reference (upstream issue 10): keep both explicit."""
    if tokenizer.chat_template is None:
        return message
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


def encode(text: str, tokenizer) -> list[int]:
    """Token ids of a prompt. A chat template already writes its special tokens; plain text gets the
    tokenizer's own (a BOS, for models that expect one)."""
    return tokenizer(text, add_special_tokens=tokenizer.chat_template is None).input_ids


# ---------------------------------------------------------------------------------------------------------
# The tiny model's tokenizer: one token per character, plus one token per fixed piece of the two prompt
# templates, so that the paper's long instructions cost the tiny model one position each.

def char_tokenizer() -> PreTrainedTokenizerFast:
    pieces = {p for t in (STUDENT, TEACHER) for p in t.format(question="\0", solution="\0").split("\0") if p}
    phrases = sorted(pieces | {"\\boxed{"}, key=len, reverse=True)  # longest first: the regex takes the first match
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + phrases + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(
        Regex("|".join(map(re.escape, phrases)) + r"|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # decoding concatenates the pieces: text round-trips exactly
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


if __name__ == "__main__":
    tokenizer = char_tokenizer()
    for ex in builtin_examples("train", 3):
        for prompt in (student_prompt(ex, tokenizer), teacher_prompt(ex, tokenizer)):
            print(f"--- {len(encode(prompt, tokenizer))} tokens\n{prompt}")
        print(f"--- completion to learn: {ex.solution}\n")
