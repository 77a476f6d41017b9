"""evaluate.py: how well does the model answer, from the question alone or with the reference in its context?

Owns: answer extraction (the last \\boxed{...}), a numeric equivalence check, and the evaluation loop:
the accuracy averaged over k sampled completions per problem (the paper's Avg@k), and its command line.
Leaves out: symbolic equivalence (fractions, surds, intervals), pass@k and maj@k.

    python evaluate.py --model tiny/model                    # the tiny base model, question alone
    python evaluate.py --model tiny/model --with_reference   # the same model as the teacher
"""

import argparse

import torch

from data import Example, encode, load_examples, student_prompt, teacher_prompt


def extract_answer(text: str) -> str | None:
    """The content of the last \\boxed{...}, nested braces included (None if it is cut off); without a box,
    what follows the last '####' (GSM8K's solutions); else None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return text.rsplit("####", 1)[1].strip() or None if "####" in text else None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip()
    return None


def is_equivalent(pred: str | None, gold: str) -> bool:
    """Equal as numbers where both are numbers ('1,000' = '1000.0'), else equal as strings without spaces and $."""
    if pred is None:
        return False
    pred, gold = (s.replace("$", "").replace(" ", "") for s in (pred, gold))
    try:
        return abs(float(pred.replace(",", "")) - float(gold.replace(",", ""))) < 1e-6
    except ValueError:
        return pred == gold


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[Example], with_reference: bool = False, thinking: bool = False,
             samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             max_new_tokens: int = 64, batch_size: int = 256, seed: int = 0) -> float:
    """Accuracy averaged over `samples` completions per problem (Avg@k). The student sees the question
    alone; with_reference=True gives the model the teacher's context instead."""
    from opsd import sample  # imported here: opsd imports this file

    prompt = teacher_prompt if with_reference else student_prompt
    prompts = [encode(prompt(ex, tokenizer, thinking), tokenizer) for ex in examples for _ in range(samples)]
    answers = [ex.answer for ex in examples for _ in range(samples)]
    generator = torch.Generator(model.device).manual_seed(seed)
    model.eval()
    correct = 0
    for i in range(0, len(prompts), batch_size):
        completions = sample(model, prompts[i:i + batch_size], max_new_tokens, temperature, top_p, top_k,
                             tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        correct += sum(is_equivalent(extract_answer(t), a) for t, a in zip(texts, answers[i:i + batch_size]))
    return correct / len(prompts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny/model", help="local path or hub name of the model")
    parser.add_argument("--dataset", default="builtin", help="'builtin' or a local JSON/JSONL/CSV/parquet file")
    parser.add_argument("--n", type=int, default=500, help="number of problems")
    parser.add_argument("--with_reference", action="store_true", help="show the reference solution (teacher)")
    parser.add_argument("--thinking", action="store_true", help="chat template with thinking on")
    parser.add_argument("--samples", type=int, default=1, help="completions per problem (k of Avg@k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 keeps the whole vocabulary")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from opsd import load_model

    model, tokenizer = load_model(args.model)
    examples = load_examples(args.dataset, "test", args.n)
    acc = evaluate(model, tokenizer, examples, with_reference=args.with_reference, thinking=args.thinking,
                   samples=args.samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=args.max_new_tokens, seed=args.seed)
    context = "with the reference" if args.with_reference else "question alone"
    print(f"{args.model}: {acc:.1%} avg@{args.samples} on {len(examples)} problems ({context})")


if __name__ == "__main__":
    main()
