"""tiny/build.py: trains the tiny base model that the offline demo starts from, and writes it to tiny/model.

A 1M-parameter Llama-style model (4 layers, 128 wide, tied embeddings) with the character tokenizer of
data.py, trained by supervised learning (cross-entropy) on the built-in task's reference solutions: half of
the batches after the student's prompt, half after the teacher's. Trained briefly, it copies a reference
that sits in its context but rarely solves a problem from the question alone: the gap OPSD closes.
--other_style builds the base model of the 'builtin_other' variant (tiny/model_other) the same way, except
that the references in the teacher's prompt are written in another style (data.py) while every target stays
in the model's own style: it answers alone in its own style and reads the other style as a teacher. That
takes two runs. After the same 3,000 steps its teacher reads 86% right, but its student solves only 4%;
the second run continues it with three batches in four on the student's prompt, for 1,400 steps, so that
its student starts near the default model's 21% (then: student 24.2%, teacher 86.2%). (From scratch at three in
four, the student learned as fast as the teacher: no gap.) Deterministic (seeded, fixed step counts); the
results ship in the repo, so nobody has to run this.

    python tiny/build.py                  # about 18 minutes on 2 CPU cores
    python tiny/build.py --other_style --out runs/model_other_first     # about 30 minutes
    python tiny/build.py --other_style --init runs/model_other_first --teacher_every 4 --steps 1400  # 15 more
"""

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for data, opsd, evaluate
from data import builtin_examples, char_tokenizer, encode, student_prompt, teacher_prompt  # noqa: E402
from evaluate import evaluate  # noqa: E402
from opsd import completion_logits, pad_right  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of 32 problems")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--other_style", action="store_true", help="references of the 'builtin_other' variant")
    parser.add_argument("--teacher_every", type=int, default=2, help="every this many batches is the teacher's")
    parser.add_argument("--init", default="", help="continue training this model instead of a new one")
    parser.add_argument("--out", default="", help="where the model goes (default: tiny/model or tiny/model_other)")
    parser.add_argument("--eval_every", type=int, default=250, help="held-out accuracy every this many steps")
    args = parser.parse_args()
    out = args.out or str(Path(__file__).parent / ("model_other" if args.other_style else "model"))

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM.from_pretrained(args.init) if args.init else LlamaForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train_set, references = (builtin_examples("train", 20_000, other_style=o) for o in (False, args.other_style))
    test_set = builtin_examples("test", 500, other_style=args.other_style)  # train_set[i], references[i]: one problem
    rng = random.Random(0)
    for step in range(args.steps):
        if step % args.eval_every == 0 or step == args.steps - 1:
            student = evaluate(model, tokenizer, test_set, with_reference=False, max_new_tokens=40)["avg@1"]
            teacher = evaluate(model, tokenizer, test_set, with_reference=True, max_new_tokens=40)["avg@1"]
            print(f"step {step:5d}: student {student:.1%}, teacher {teacher:.1%}", flush=True)
        batch = rng.sample(range(len(train_set)), 32)
        prompt = teacher_prompt if step % args.teacher_every == args.teacher_every - 1 else student_prompt
        prompts = [encode(prompt(references[i], tokenizer), tokenizer) for i in batch]
        targets = [encode(train_set[i].solution, tokenizer) + [tokenizer.eos_token_id] for i in batch]  # own style
        model.train()
        logits, mask = completion_logits(model, prompts, targets)  # (B, L, V), (B, L)
        loss = F.cross_entropy(logits[mask], pad_right(targets, model.device)[mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
