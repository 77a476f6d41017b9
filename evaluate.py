"""evaluate.py: how well does the model answer, from the question alone or with the reference in its context?

Owns: grading answers as mathematics rather than as strings (data.extract_answer reads them), the evaluation
loop (avg@k, the paper's headline, with its standard errors; pass@k; maj@k; completion lengths and truncation;
one JSONL row per problem) and its command line, with the paper's benchmarks as presets.
Leaves out: symbolic algebra (variables, equations, matrices: math_verify covers some) and an inference engine.

    python evaluate.py --model tiny/model [--with_reference]   # the tiny base model, question alone (or as teacher)
    python evaluate.py --model Qwen/Qwen3-1.7B --dataset aime24 --samples 12 --thinking \\
        --temperature 1.0 --top_p 0.95 --max_new_tokens 38912 --batch_size 12   # the paper's Avg@12
"""

import argparse
import ast
import json
import math
import operator
import os
import re
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data import (BENCHMARKS, PRESETS, Example, encode, evaluation_prompt, extract_answer, load_examples,
                  student_prompt, teacher_prompt)
from sampling import best_device, load_model, sample, stop_ids

try:
    import math_verify  # optional: symbolic equivalence, asked only where the rules below cannot decide
except ImportError:
    math_verify = None


# ---------------------------------------------------------------------------------------------------------
# Grading: two answers are equal when they are the same number, tuple or interval, whatever their form.

UNITS = ("cm|mm|km|m|kg|g|mg|lbs?|pounds?|ounces?|oz|inch(?:es)?|in|feet|foot|ft|yards?|miles?|mph|meters?|metres?"
         "|centimeters?|hours?|hrs?|minutes?|mins?|seconds?|secs?|s|days?|weeks?|months?|years?|dollars?|cents?"
         "|degrees?|units?|square|sq|cubic|liters?|litres?|ml|l")  # words after a number that never change it


def normalize(answer: str) -> str:
    """The answer without what never changes its value ($, spaces, \\left/\\right, \\text{}, units after a
    number, degrees, percent signs, thousands separators, a leading 'x ='); 1\\frac12 becomes (1+\\frac{1}{2})."""
    s = re.sub(r"\{,\}", ",", answer)  # 1{,}000
    s = re.sub(r"\\left|\\right|\\[!,;: ]|\\quad|\\displaystyle|~|\\?\$", " ", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree|\\?%", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"^\s*([-+]?[\d.,/]*\d)\s*\\(?:text|mbox)\{[^{}]*\}\s*$", r"\1", s)  # '5\text{ cm}' -> '5'
    while (unwrapped := re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}", r" \1 ", s)) != s:
        s = unwrapped
    s = re.sub(rf"^([-+]?[\d.,/]*\d)\s*(?:(?:{UNITS})\.?\s*)+$", r"\1", s.strip(), flags=re.I)  # '5 cm' -> '5'
    s = re.sub(r"(?<![\w.}])(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}", r"\1(\2+\\frac{\3}{\4})", s)  # mixed numbers
    if s.count("=") == 1:
        s = re.sub(r"^[a-zA-Z]\w*\s*=", "", s)  # 'x = 5' -> '5'
    s = re.sub(r"\s+", "", s).rstrip(".").removeprefix("+")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")  # 1,000 -> 1000
    return re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # multiple choice: '(B)' -> 'B'


OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.Pow: operator.pow}


def to_number(answer: str) -> float | None:
    """The value of a normalised answer made of numbers, + - * / ^, fractions, square roots and pi, else None.
    The LaTeX becomes a Python expression that is evaluated node by node (never with eval)."""
    if "_" in answer:  # Python reads 10_2 as 102
        return None
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", answer, re.IGNORECASE):  # not inf, not nan
        return float(answer) if math.isfinite(float(answer)) else None  # 1e400 overflows
    expr, before = answer, None
    while expr != before:  # innermost braces first, so that fractions and roots can nest
        before = expr
        expr = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", expr)
        expr = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", expr)
    for latex, python in (("\\pi", "pi"), ("\\cdot", "*"), ("\\times", "*"), ("^", "**"), ("{", "("), ("}", ")")):
        expr = expr.replace(latex, python)
    expr = re.sub(r"(?<=[\d)])(?=[(a-z])|(?<=pi)(?=[\d(a-z])", "*", expr)  # 2sqrt(2) -> 2*sqrt(2)

    def value(node) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == "pi":
            return math.pi
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "sqrt" and len(node.args) == 1:
            return math.sqrt(value(node.args[0]))
        raise ValueError(f"not a number: {ast.dump(node)}")

    try:
        result = value(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return result if isinstance(result, float) and math.isfinite(result) else None


def same_value(a: str, b: str) -> bool:
    """Equal normalised strings, equal integers, or numbers equal to a relative 1e-6."""
    if a == b:
        return True
    if re.fullmatch(r"-?\d+", a) and re.fullmatch(r"-?\d+", b):
        return int(a) == int(b)  # exact, however large
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def split_items(answer: str) -> tuple[str, list[str]]:
    """A tuple or interval as its brackets and items: '[0,1)' -> ('[)', ['0', '1']); a single value as ('', [value])."""
    brackets, inner = "", answer
    if len(answer) > 1 and answer[0] in "([" and answer[-1] in ")]":
        brackets, inner = answer[0] + answer[-1], answer[1:-1]
    items, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    return (brackets, items) if len(items) > 1 else ("", [answer])


def is_equivalent(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold one as mathematics (normalize, to_number); tuples and intervals
    item by item, with the same brackets. Where the rules cannot decide, math_verify (if installed) does."""
    if pred is None:
        return False
    pred, gold = normalize(pred), normalize(gold)
    (pred_brackets, pred_items), (gold_brackets, gold_items) = split_items(pred), split_items(gold)
    if pred_brackets == gold_brackets and len(pred_items) == len(gold_items):
        if all(map(same_value, pred_items, gold_items)):
            return True
    if math_verify is None or (to_number(pred) is not None and to_number(gold) is not None):
        return False  # two different numbers: nothing left to ask
    try:
        return bool(math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(f"${pred}$")))
    except Exception:  # its parser fails on some inputs (and off the main thread): keep the rules' answer
        return False


# ---------------------------------------------------------------------------------------------------------
# Scores over k completions per problem.

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)


def grade(completions: list[str], answer: str, strict: bool = False) -> dict:
    """One problem's completions: the answer each gives (extract_answer, strict or not), whether it is right,
    and the majority answer (equivalent answers vote together; of groups tied at the top, the first to appear)."""
    extracted = [extract_answer(c, strict) for c in completions]
    votes = {}  # representative answer -> count, in the order of first appearance
    for a in filter(None, extracted):
        representative = next((r for r in votes if is_equivalent(a, r)), a)
        votes[representative] = votes.get(representative, 0) + 1
    majority = max(votes, key=votes.get) if votes else None
    return {"extracted": extracted, "correct": [is_equivalent(a, answer) for a in extracted],
            "majority": majority, "majority_correct": is_equivalent(majority, answer)}


def mean(values) -> float:
    return sum(values) / max(len(values), 1)


def standard_error(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def summarize(rows: list[dict], k: int) -> dict:
    """avg@k (the mean accuracy over all completions) with its standard errors over the k samples (the spread of
    the k avg@1s: what a rerun with other seeds would move it by) and over the problems (what other problems
    would), pass@j for j = 1, 2, 4, ..., k, maj@k, the mean completion length and the fraction cut at the limit."""
    scores = {"problems": len(rows), "samples": k, f"avg@{k}": mean([mean(r["correct"]) for r in rows]),
              "se_samples": standard_error([mean([r["correct"][s] for r in rows]) for s in range(k)]),
              "se_problems": standard_error([mean(r["correct"]) for r in rows])}
    for j in sorted({2 ** i for i in range(k.bit_length())} | {k}):
        scores[f"pass@{j}"] = mean([pass_at_k(k, sum(r["correct"]), j) for r in rows])
    scores[f"maj@{k}"] = mean([r["majority_correct"] for r in rows])
    scores["mean_length"] = mean([n for r in rows for n in r["lengths"]])
    scores["truncated"] = mean([t for r in rows for t in r["truncated"]])
    return scores


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[Example], with_reference: bool = False, thinking: bool = False,
             samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             max_new_tokens: int = 64, batch_size: int = 64, seed: int = 0, out_path: str | None = None,
             progress: bool = False, paper: bool = False, fast: bool = False) -> dict:
    """summarize's scores of `samples` completions per problem, from the question alone or (with_reference) the
    teacher's context; out_path gets one JSONL row per problem as it is graded (in order of prompt length). paper=True:
    as the paper evaluates its benchmarks, evaluation_prompt and the last \\boxed{} only. fast=True: the fast path."""
    if with_reference and not all(ex.solution for ex in examples):
        raise ValueError("with_reference needs reference solutions, and some problems have none: name the "
                         "column with --solution_column")
    render = teacher_prompt if with_reference else evaluation_prompt if paper else student_prompt
    prompts = [render(ex, tokenizer, thinking) for ex in examples]
    ids = [encode(p, tokenizer) for p in prompts]
    order = sorted(range(len(examples)), key=lambda i: len(ids[i]))  # prompts of similar lengths: little padding
    generator, stops = torch.Generator(model.device).manual_seed(seed), stop_ids(model, tokenizer)
    model.eval()
    if out_path:  # a row per problem, written as soon as it is graded: a run that is stopped keeps them
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text("")
    rows, per_batch = {}, max(1, batch_size // samples)  # problems per batch, all their samples side by side
    for start in tqdm(range(0, len(order), per_batch), desc="evaluate", disable=not progress):
        batch = order[start:start + per_batch]
        outputs = sample(model, [ids[i] for i in batch for _ in range(samples)], max_new_tokens, temperature, top_p,
                         top_k, stops, tokenizer.pad_token_id, generator, fast)
        for j, i in enumerate(batch):
            mine = outputs[j * samples:(j + 1) * samples]
            texts = tokenizer.batch_decode(mine, skip_special_tokens=True)
            rows[i] = {"question": examples[i].question, "answer": examples[i].answer, "prompt": prompts[i],
                       "completions": texts, **grade(texts, examples[i].answer, strict=paper),
                       "lengths": list(map(len, mine)),
                       "truncated": [len(o) == max_new_tokens and o[-1] not in stops for o in mine]}
            if out_path:
                with open(out_path, "a") as f:
                    f.write(json.dumps(rows[i]) + "\n")
    return summarize([rows[i] for i in range(len(examples))], samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny/model", help="path, hub name, or run folder (its newest checkpoint)")
    parser.add_argument("--dataset", default="builtin",
                        help=f"builtin, builtin_other, a preset ({', '.join(PRESETS)}), a hub data set or a file")
    parser.add_argument("--split", default="test", help="split of a hub data set (one with a single split uses it)")
    parser.add_argument("--n", type=int, default=None, help="number of problems (default: all; built-in: 500)")
    for column in ("question", "solution", "answer"):
        parser.add_argument(f"--{column}_column", default="", help=f"column of the {column}s (default: the preset's)")
    parser.add_argument("--with_reference", action="store_true", help="show the reference solution (teacher)")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, help="chat template thinking flag "
                        "(default: on with --with_reference, off without, as in training)")
    parser.add_argument("--samples", type=int, default=1, help="completions per problem (k of avg@k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 keeps the whole vocabulary")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64, help="completions sampled at once (at least "
                        "one problem's --samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a static cache and a compiled decode step (GPUs)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--trust_remote_code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--out", default=None, help="JSONL of every completion, scores beside it "
                        "(default: runs/eval/MODEL_DATASET[_with_reference].jsonl)")
    args = parser.parse_args()

    paper = args.dataset in BENCHMARKS or args.dataset in (PRESETS[b][0] for b in BENCHMARKS)
    run = Path(args.model).parent if Path(args.model).name == "latest" else Path(args.model)
    if (run / "latest").is_file():  # a run folder: its newest checkpoint
        args.model = str(run / (run / "latest").read_text().strip())
    thinking = args.with_reference if args.thinking is None else args.thinking  # the teacher's or the student's
    model = Path(args.model).resolve() if Path(args.model).exists() else Path(args.model)  # a hub name: as it is
    out = args.out or (f"runs/eval/{'_'.join(model.parts[-2:])}_{Path(args.dataset).stem}"
                       f"{'_with_reference' * args.with_reference}.jsonl")
    if best_device() == "cpu":  # threads that other jobs leave free: a thread that waits for a core stalls the rest
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # Linux
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # not on Windows
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - round(load))))
        print(f"{torch.get_num_threads()} CPU threads ({cores} cores, load average {load:.1f} before this started)")
    try:  # bad input: one line that says what to do, no traceback, nothing written
        examples = load_examples(args.dataset, args.split, args.n, question_column=args.question_column,
                                 solution_column=args.solution_column, answer_column=args.answer_column)
        model, tokenizer = load_model(args.model, args.dtype, args.trust_remote_code)
        Path(out).with_suffix(".scores.json").unlink(missing_ok=True)  # an earlier run's, until these are done
        scores = evaluate(model, tokenizer, examples, with_reference=args.with_reference, thinking=thinking,
                          samples=args.samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                          out_path=out, progress=True, paper=paper, fast=args.fast)
    except ValueError as e:
        sys.exit(f"evaluate.py: error: {e}")
    context = "with the reference" if args.with_reference else "the paper's prompt" if paper else "question alone"
    decoding = "greedy" if args.temperature == 0 else f"T {args.temperature}, top-p {args.top_p}, top-k {args.top_k}"
    print(f"{args.model} on {args.dataset}: {len(examples)} problems, {context}, {args.samples} completion(s) each "
          f"({decoding}), up to {args.max_new_tokens} new tokens, thinking {'on' if thinking else 'off'}")
    errors = [f"{scores[key]:.1%} over the {what}" for key, what in (("se_samples", f"{args.samples} samples"),
              ("se_problems", "problems")) if scores[key] is not None]
    errors = f" (standard error {', '.join(errors)})" if errors else ""
    print(" | ".join(f"{key} {value:.1%}" + errors * key.startswith("avg@")
                     for key, value in scores.items() if "@" in key))
    Path(out).with_suffix(".scores.json").write_text(json.dumps(scores, indent=1))
    print(f"mean length {scores['mean_length']:.1f} tokens | truncated at the limit {scores['truncated']:.1%} | "
          f"every completion: {out}, the scores beside it")


if __name__ == "__main__":
    main()
