"""data.py: the examples OPSD learns from, and the two prompts that turn one model into student and teacher.

Owns: the `Example` record, the built-in offline task (two-step arithmetic word problems), loading hub data
sets (with column presets) and local files, `extract_answer`, the official student, teacher and evaluation
prompts, fitting them into a token budget, and the character tokenizer of the tiny model.
Leaves out: tokenising whole data sets ahead of time (prompts are encoded per batch), streaming.

    python data.py      # prints a few built-in problems with both prompts
"""

import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

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
# Its variant 'builtin_other' has the same problems with references "by another model", answer first, in words:
# "\boxed{4}, as 11 plus 48 is 59 and 59 minus 55 is 4."; its base model, tiny/model_other, writes its own style
# and reads the other one in the teacher's context. 'builtin_other_working_first' keeps the other style but
# puts the working before the answer: "11 plus 48 is 59 and 59 minus 55 is 4, so \boxed{4}."

NAMES = ["ann", "ben", "eva", "joe", "kim", "leo", "mia", "sam", "tom", "zoe"]
ITEMS = ["apples", "books", "cards", "coins", "eggs", "pens", "shells", "stamps"]
MORE = ["gets {} more", "finds {} more", "buys {} more"]
LESS = ["gives away {}", "loses {}", "sells {}"]


def builtin_examples(split: str, n: int, seed: int = 0, other_style: bool = False,
                     working_first: bool = False) -> list[Example]:
    """n problems of the built-in task ('builtin_other' with other_style; with working_first too,
    'builtin_other_working_first'); a seed gives the same problems in every style. The split is decided by a hash
    of the arithmetic alone, so no calculation of the 'test' split ever appears in 'train', whatever the seed."""
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
        word1, word2 = ("plus" if sign == "+" else "minus" for sign in (sign1, sign2))
        words = f"{a} {word1} {b} is {r1} and {r1} {word2} {c} is {r2}"
        solution = (f"{words}, so \\boxed{{{r2}}}." if other_style and working_first else
                    f"\\boxed{{{r2}}}, as {words}." if other_style else
                    f"{a}{sign1}{b}={r1}, {r1}{sign2}{c}={r2}. \\boxed{{{r2}}}")
        examples.append(Example(f"{name} has {a} {item}, {step1}, then {step2}. how many {item} now?", solution,
                                str(r2)))
    return examples


BUILTIN = {"builtin": {}, "builtin_other": {"other_style": True},  # the built-in tasks: builtin_examples' styles
           "builtin_other_working_first": {"other_style": True, "working_first": True}}

# Hub data sets whose columns are known: name -> (hub name, config, question, solution, answer column). With no
# answer column the answer is read from the solution; with no solution column a student can be evaluated, not trained.
PRESETS = {
    "openthoughts": ("siyanzhao/Openthoughts_math_30k_opsd", None, "problem", "solution", None),  # the paper's
    "gsm8k": ("openai/gsm8k", "main", "question", "answer", None),  # the solution ends with '#### 42'
    "math": ("DigitalLearningGmbH/MATH-lighteval", None, "problem", "solution", None),  # \boxed{} answers
    # the paper's benchmarks, and MATH-500
    "aime24": ("HuggingFaceH4/aime_2024", None, "problem", "solution", "answer"),
    "aime25": ("yentinglin/aime_2025", None, "problem", None, "answer"),
    "hmmt25": ("MathArena/hmmt_feb_2025", None, "problem", None, "answer"),
    "math500": ("HuggingFaceH4/MATH-500", None, "problem", "solution", "answer"),
}
BENCHMARKS = ("aime24", "aime25", "hmmt25")  # evaluated as the paper does: evaluation_prompt, strict extraction


def load_examples(source: str, split: str = "train", n: int | None = None, seed: int = 0, question_column: str = "",
                  solution_column: str = "", answer_column: str = "") -> list[Example]:
    """The first n examples of `split` of a built-in task (BUILTIN), a preset (short or hub name), a local
    JSON/JSONL/CSV/parquet file (all its rows) or what datasets.load_dataset opens (a hub name, a local folder;
    one split serves for every split). Columns default to the preset's, else question, solution and answer."""
    if source in BUILTIN:
        return builtin_examples(split, n or (20_000 if split == "train" else 500), seed, **BUILTIN[source])
    import datasets  # imported here: the built-in task does not need it

    preset = PRESETS.get(source) or next((p for p in PRESETS.values() if p[0] == source), None)
    name, config, *columns = preset or (source, None, "question", "solution", None)
    question_column, solution_column = question_column or columns[0], solution_column or columns[1] or ""
    answer_column = answer_column or columns[2]
    kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(source.rsplit(".", 1)[-1])
    if kind and not Path(source).is_file():
        raise ValueError(f"no data file {source!r}: check the path")
    try:  # a local file loads as one split, 'train'
        text = Path(source).read_text(encoding="utf-8") if kind in ("json", "csv") else "-"  # (datasets' errors
        if len(text.strip().splitlines()) < 1 + (kind == "csv"):  # on these name neither where nor why)
            raise ValueError(f"{source} holds no problems: it needs a row per problem (a CSV file: after a header)")
        splits = datasets.load_dataset(kind, data_files=source) if kind else datasets.load_dataset(name, config)
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError) as e:  # a malformed or non-UTF-8 file
        why = re.sub(r" in row \d+", "", str(e.__cause__ or e)).rstrip(".")  # its rows count within a block: no line
        raise ValueError(f"cannot read {source}: {why}. Fix the file (UTF-8; JSONL: one object a line)") from None
    except OSError as e:  # not on the hub, or the hub out of reach
        raise ValueError(f"cannot load the data set {source!r}: {str(e).splitlines()[0]} (offline, a hub data "
                         "set must be in the local cache; a local file needs a .jsonl, .json, .csv or .parquet "
                         "name)") from None
    if split not in splits and len(splits) > 1:
        raise ValueError(f"dataset {source!r} has no {split!r} split; it has {list(splits)}")
    rows = splits[split] if split in splits else next(iter(splits.values()))
    missing = [c for c in (question_column, solution_column, answer_column) if c and c not in rows.column_names]
    if missing:
        raise ValueError(f"dataset {source!r} lacks the column(s) {missing}; it has {rows.column_names}. Name "
                         "the right ones with --question_column, --solution_column, --answer_column.")
    if answer_column and answer_column == solution_column:
        raise ValueError(f"the answer column {answer_column!r} is the solution column: the whole solution would be "
                         "the answer. Leave --answer_column out to read it from the solution")
    examples = []
    for i, r in enumerate(rows.select(range(min(n or len(rows), len(rows))))):
        cell = r[answer_column] if answer_column else None  # an empty cell: the answer in the solution, if any
        answer = str(cell) if cell not in (None, "") else extract_answer(r.get(solution_column) or "")
        if answer is None:
            raise ValueError(f"dataset {source!r}, row {i}: no answer (no answer column, or an empty cell) and no "
                             "final answer (\\boxed{} or '####') in the solution: set --answer_column or fix the row")
        examples.append(Example(r[question_column], r[solution_column] if solution_column else "", answer))
    return examples


# ---------------------------------------------------------------------------------------------------------
# The final answer of a solution or a completion, for data sets without an answer column and for evaluate.py.

def extract_answer(text: str, strict: bool = False) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...}, nested braces included (None if it is cut off);
    without a box, what follows the last '####' (GSM8K's convention) or 'the (final) answer is'; else None. strict:
    the last \\boxed{...} only, the rule of the paper's evaluation."""
    boxes = list(re.finditer(r"\\boxed\{" if strict else r"\\(?:boxed|fbox)\{", text))
    if boxes:
        depth, begin = 0, boxes[-1].end()
        for i in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth < 0:
                return text[begin:i].strip()
        return None  # cut off inside the box
    for marker in () if strict else ("####", "the (?:final )?answer is:?"):
        found = re.findall(marker + r"(.*)", text, re.IGNORECASE)
        if found:
            return re.sub(r"^[\s$*]+|[\s$*.]+$", "", found[-1]) or None
    return None


# ---------------------------------------------------------------------------------------------------------
# The two contexts, verbatim from the paper's official code (github.com/siyan-zhao/OPSD; \u2014 is an em dash).
# The student sees the problem; the teacher sees the problem and a reference solution, with a request to
# derive the answer itself rather than copy it.

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{{}}."  # a format string
STUDENT = "Problem: {question}\n\n" + INSTRUCTION
TRANSITION = ("\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind "
              "each step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, "
              "derive the same final answer to the problem above. Think step by step, explore different approaches, "
              "and don't be afraid to backtrack or reconsider if something doesn't work out:\n")
TEACHER = ("Problem: {question}\n\nHere is a reference solution to this problem:\n"
           "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n" + TRANSITION + "\n"
           + INSTRUCTION)
EVALUATION = "{question}\n\n" + INSTRUCTION  # the official evaluation of the paper's benchmarks: no "Problem: "


def student_prompt(example: Example, tokenizer, thinking: bool = False) -> str:
    """The student's context: the problem alone."""
    return render(STUDENT.format(question=example.question), tokenizer, thinking)


def evaluation_prompt(example: Example, tokenizer, thinking: bool = True) -> str:
    """The official prompt of the paper's benchmarks: the student's without 'Problem: '."""
    return render(EVALUATION.format(question=example.question), tokenizer, thinking)


def teacher_prompt(example: Example, tokenizer, thinking: bool = True) -> str:
    """The teacher's context: the problem and the privileged reference solution."""
    return render(TEACHER.format(question=example.question, solution=example.solution), tokenizer, thinking)


def fit_prompts(examples: list[Example], tokenizer, limit: int, student_thinking: bool = False,
                teacher_thinking: bool = True) -> list[Example]:
    """The examples whose prompts fit in `limit` tokens: a reference too long is cut in its middle, never the
    question or instructions (shorten_reference); an example that still does not fit is dropped; both reported."""
    fitted = [shorten_reference(ex, tokenizer, limit, student_thinking, teacher_thinking) for ex in examples]
    kept = [ex for ex in fitted if ex is not None]
    shortened = sum(ex is not None and ex is not original for ex, original in zip(fitted, examples))
    if shortened or len(kept) < len(examples):
        print(f"warning: {shortened} of {len(examples)} examples had their reference solution shortened and "
              f"{len(examples) - len(kept)} were skipped to fit their prompts in {limit} tokens")
    return kept


def shorten_reference(example: Example, tokenizer, limit: int, student_thinking: bool = False,
                      teacher_thinking: bool = True) -> Example | None:
    """The example itself if both prompts fit; else the example with the middle of its reference cut out until
    the teacher prompt fits; None if the student prompt or the teacher prompt with an empty reference does
    not fit. Each round re-counts the real prompt, so tokens that merge at the cut cannot fool it."""
    if len(teacher_prompt(example, tokenizer, teacher_thinking).encode()) + 4 <= limit:
        return example  # a token covers at least one byte (4 spare for a BOS and the like): no need to count
    if len(encode(student_prompt(example, tokenizer, student_thinking), tokenizer)) > limit:
        return None
    solution_ids = tokenizer(example.solution, add_special_tokens=False).input_ids
    shortened, keep = example, len(solution_ids)
    while (excess := len(encode(teacher_prompt(shortened, tokenizer, teacher_thinking), tokenizer)) - limit) > 0:
        if keep == 0:
            return None
        keep = max(keep - excess, 0)  # reference tokens to keep, half from each end
        head, tail = solution_ids[:keep // 2], solution_ids[len(solution_ids) - (keep - keep // 2):]
        cut = f"\n[... {len(solution_ids) - keep} tokens left out ...]\n"
        shortened = Example(example.question, tokenizer.decode(head) + cut + tokenizer.decode(tail), example.answer)
    return shortened


def render(message: str, tokenizer, thinking: bool) -> str:
    """A user turn through the tokenizer's chat template, or the plain message when it has none. The
    student and teacher thinking flags differ in the paper's code, which makes the first completion
    tokens disagree for reasons unrelated to the reference (upstream issue 10): keep both explicit."""
    if tokenizer.chat_template is None:
        return message
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


def encode(text: str, tokenizer) -> list[int]:
    """Token ids of a prompt: a chat template writes its special tokens; plain text gets the tokenizer's (a BOS, where
    the model expects one)."""
    return tokenizer(text, add_special_tokens=tokenizer.chat_template is None).input_ids


# ---------------------------------------------------------------------------------------------------------
# The tiny model's tokenizer: one token per character, and one per fixed piece of the two prompt templates,
# so that the paper's long instructions cost the tiny model one position each.

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
