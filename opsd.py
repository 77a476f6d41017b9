"""opsd.py: On-Policy Self-Distillation (OPSD, arXiv 2601.18734) in plain PyTorch.

One model plays two roles that differ only in their context. The student p_S(. | x) sees the problem; the
teacher p_T(. | x, y*) also sees a reference solution y*. The student samples its own rollout y_hat; the
teacher re-scores the same tokens in one forward pass; training minimises, on the student's own tokens,

    L = E_x E_{y_hat ~ p_S} [ 1/|y_hat| sum_n D( p_T(. | x, y*, y_hat_<n) || p_S(. | x, y_hat_<n) ) ]   (Eq. 8)

The code averages over all completion tokens of a step rather than per rollout (train_step says why).
Owns the method, in the algorithm's order: 1. rollouts, 2. the two-context forward pass, 3. the divergences,
4. the loss of one batch (`opsd_loss`; the SFT and GRPO baselines beside it), 5. one optimizer step
(`train_step`), 6. the fused path (no (N, V) logits); then the engineering: `Config` (`cfg` above), evaluation
during training, torchrun (`torchrun --nproc_per_node=N opsd.py` splits each step's problems; the lines marked
"torchrun:"), checkpoints and the loop `train`. It builds on sampling.py, lora.py, evaluate.py and data.py,
none of which imports it. Leaves out: FSDP, vLLM, peft, a Trainer.
Shapes: B rollouts, P prompt length, L completion length, V vocabulary, H hidden size, N completion tokens
of a batch, C tokens per chunk of the fused divergence.

    python opsd.py           # the built-in demo: tiny model, synthetic task, 2 CPU cores, 6 to 8 minutes
    python opsd.py --help    # every setting
"""

import argparse
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from data import BUILTIN, Example, encode, extract_answer, fit_prompts, load_examples, student_prompt, teacher_prompt
from evaluate import evaluate, is_equivalent
from lora import adapters_off, add_lora, describe_lora, load_adapters, lora_layers, merged_state_dict, save_adapters
from plot import plot_run
from sampling import load_model, pad_left, resolve_dtype, sample, stop_ids

# ---------------------------------------------------------------------------------------------------------
# 1. Rollouts: the student writes one completion per problem, on its own prompt (sampling.sample).

@dataclass
class Rollouts:
    """One step's batch, row by row: both prompts as token ids, and the completion the loss is taken on."""
    student_prompts: list[list[int]]  # the student's prompt: the problem x
    teacher_prompts: list[list[int]]  # the teacher's prompt: x and the reference solution y*
    completions: list[list[int]]  # y_hat ~ p_S(. | x), ending in EOS unless cut at max_new_tokens (SFT: y*)
    rewards: torch.Tensor  # (B,) 1.0 where the completion's final answer is right: GRPO's reward, and logged
    truncated: torch.Tensor  # (B,) True where the completion was cut at max_new_tokens: logged


def collect_rollouts(model, tokenizer, problems: list[Example], cfg: "Config", generator) -> Rollouts:
    """Each problem cfg.group_size times in a row (default 1), and a rollout of each sampled from the
    student under no_grad. On-policy: the student is trained on the states it visits itself. (SFT takes the
    reference solution instead of sampling.)"""
    problems = [ex for ex in problems for _ in range(cfg.group_size)]
    student_prompts = [encode(student_prompt(ex, tokenizer, cfg.student_thinking), tokenizer) for ex in problems]
    teacher_prompts = [encode(teacher_prompt(ex, tokenizer, cfg.teacher_thinking), tokenizer) for ex in problems]
    model.eval()
    stops = stop_ids(model, tokenizer)
    if cfg.method == "sft":  # the baseline imitates the references: nothing is sampled
        completions = [(tokenizer(ex.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
                       [:cfg.max_new_tokens] for ex in problems]
    else:
        completions = sample(model, student_prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                             stops, tokenizer.pad_token_id, generator, cfg.fast_sampling)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards = torch.tensor([float(is_equivalent(extract_answer(t), ex.answer)) for t, ex in zip(texts, problems)])
    truncated = torch.tensor([len(c) == cfg.max_new_tokens and c[-1] not in stops for c in completions])
    k = cfg.skip_tokens  # the loss leaves out the first k completion tokens: they join both prompts, as context
    prompts = [[p + c[:k] for p, c in zip(side, completions)] for side in (student_prompts, teacher_prompts)]
    return Rollouts(*prompts, [c[k:] for c in completions], rewards, truncated)


# ---------------------------------------------------------------------------------------------------------
# 2. The two-context forward pass: the same completions scored after the student's and the teacher's prompts.

def pad_right(completions: list[list[int]], device) -> torch.Tensor:
    """Completion ids (B, L), padded on the right with 0 (which the mask hides)."""
    L = max(map(len, completions))
    return torch.tensor([c + [0] * (L - len(c)) for c in completions], device=device)


def completion_batch(prompts: list[list[int]], completions: list[list[int]], device):
    """The inputs of one forward pass that scores each completion after its prompt, and the mask (B, L) of
    real completion tokens. Row i is [pads, prompt_i, completion_i, pads]: every prompt ends in column P - 1, so
    completion token j sits in column P + j of every row, after the student's prompts as after the teacher's,
    and is predicted from column P + j - 1."""
    prompt_ids, prompt_mask = pad_left(prompts, 0, device)  # (B, P), (B, P)
    completion_ids = pad_right(completions, device)  # (B, L)
    lengths = torch.tensor([len(c) for c in completions], device=device)
    mask = torch.arange(completion_ids.size(1), device=device) < lengths[:, None]  # (B, L)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)  # (B, P + L)
    inputs = {"input_ids": torch.cat([prompt_ids, completion_ids], 1), "attention_mask": attention_mask,
              "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
              "use_cache": False}  # one pass over the whole sequence: a KV cache would be built for nothing
    return inputs, mask


def completion_logits(model, prompts: list[list[int]], completions: list[list[int]]):
    """Logits (B, L, V) that predict each completion token from its prompt and the completion prefix, and
    the mask (B, L). Called with the student's and with the teacher's prompts: the two-context pass."""
    inputs, mask = completion_batch(prompts, completions, model.device)
    # logits only for the last L + 1 columns, P-1 .. P+L-1 (the prompt's predictions are never needed)
    return model(**inputs, logits_to_keep=mask.size(1) + 1).logits[:, :-1], mask  # (B, L, V), (B, L)


def completion_hidden(model, prompts: list[list[int]], completions: list[list[int]]):
    """The final hidden states (B, L, H) at the same positions, and the mask (B, L): completion_logits
    without the LM head, which fused_divergence applies a chunk at a time."""
    inputs, mask = completion_batch(prompts, completions, model.device)
    return model.base_model(**inputs).last_hidden_state[:, -mask.size(1) - 1:-1], mask  # (B, L, H), (B, L)


# ---------------------------------------------------------------------------------------------------------
# 3. The divergences. All of this section is float32 (float64 when given float64) whatever the model's dtype.

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, L) over the True entries of mask (B, L); 0 when there are none."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


def divergence_terms(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-vocabulary terms l_{n,v} (B, L, V) whose sum over v is D(p_T || p_S) at each token: JSD_beta
    (Eq. 7) for 0 < beta < 1, and its two KL limits at the ends. Eq. 7 itself is 0 at beta = 0 and 1 (the
    mixture is then one of the two distributions), but JSD_beta / beta tends to the forward KL(p_T || p_S) as
    beta -> 0, and JSD_beta / (1 - beta) to the reverse KL(p_S || p_T) as beta -> 1: beta = 0 and 1 mean those
    (TRL's convention). So the scale jumps at the ends: JSD_0.01 is about 0.01 x the forward KL."""
    if beta == 0:  # forward KL(p_T || p_S)
        return teacher_logp.exp() * (teacher_logp - student_logp)
    if beta == 1:  # reverse KL(p_S || p_T)
        return student_logp.exp() * (student_logp - teacher_logp)
    # Eq. 7: JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m), with m = beta p_T + (1 - beta) p_S
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1 - beta))
    return (beta * teacher_logp.exp() * (teacher_logp - mixture_logp)
            + (1 - beta) * student_logp.exp() * (student_logp - mixture_logp))


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) over the vocabulary, in float32 (float64 if given): the model's dtype may be bf16."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def divergence(student_logits, teacher_logits, mask, beta=0.0, temperature=1.0, clip=None, stats=None):
    """The per-token divergence of Eq. 8, averaged over the completion tokens in mask (B, L). beta=0 is
    forward KL(p_T || p_S), beta=1 reverse KL(p_S || p_T), in between the generalised JSD. clip caps each
    per-vocabulary term; a capped term passes no gradient, but the softmax normaliser still pushes it down.
    When a dict is given as stats, it receives the unclipped divergence, the clipped teacher mass and the
    student's entropy (at temperature T), each a mean over the tokens."""
    student_logp = log_probs(student_logits, temperature)  # (B, L, V)
    teacher_logp = log_probs(teacher_logits.detach(), temperature)  # (B, L, V): a target, never a gradient
    terms = divergence_terms(student_logp, teacher_logp, beta)  # (B, L, V)
    if stats is not None:
        with torch.no_grad():
            stats["divergence"] = masked_mean(terms.sum(-1), mask).item()
            capped_mass = (teacher_logp.exp() * (terms > clip)).sum(-1) if clip is not None else mask * 0.0
            stats["clipped_mass"] = masked_mean(capped_mass, mask).item()
            stats["entropy"] = masked_mean(-(student_logp.exp() * student_logp).sum(-1), mask).item()
    if clip is not None:
        terms = terms.clamp(max=clip)  # v3: sum_v min(l_{n,v}, tau)
    return masked_mean(terms.sum(-1), mask)


def token_log_probs(logits, completion_ids, temperature=1.0) -> torch.Tensor:
    """log p(y_n) (B, L) of the completion tokens (B, L) under logits (B, L, V)."""
    return log_probs(logits, temperature).gather(-1, completion_ids[..., None]).squeeze(-1)


def weighted_nll(student_logp, weights, mask):
    """The mean over completion tokens of -w_n log p_S(y_n), from token log-probs (B, L), with weights (B, L)
    or (B, 1) held constant. w = 1 is SFT's cross-entropy; a detached advantage makes it a policy gradient:
    GRPO's (one per rollout) and the sampled-token loss (one per token). No importance ratio: on-policy."""
    return masked_mean(-weights.detach() * student_logp, mask)


def sampled_token_loss(student_logits, teacher_logits, completion_ids, mask, temperature=1.0):
    """The sampled-token variant (v1's Eq. 9): advantage A_n = log p_T(y_n) - log p_S(y_n), held constant, and
    the loss -A_n log p_S(y_n). Its gradient is the reverse KL's in expectation over y_n ~ p_S."""
    student_logp = token_log_probs(student_logits, completion_ids, temperature)  # (B, L)
    teacher_logp = token_log_probs(teacher_logits, completion_ids, temperature)  # (B, L)
    return weighted_nll(student_logp, teacher_logp - student_logp, mask)


# ---------------------------------------------------------------------------------------------------------
# 4. The loss of one batch of rollouts: OPSD's, and beside it the two baselines of the paper's comparison.

def disable_dropout(model):
    """Dropout off for good, as in the official code (TRL switches it off): student and teacher distributions
    must differ by their contexts alone. Every dropout probability a module or its config holds (nn.Dropout,
    OPT's float `dropout` and `layerdrop`, GPT-2's `attn_pdrop`...) becomes 0. Returns the model."""
    for module in model.modules():
        for owner in (module, getattr(module, "config", None)):
            for name, value in list(getattr(owner, "__dict__", {}).items()):
                if isinstance(value, float) and "drop" in name:
                    setattr(owner, name, 0.0)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def opsd_loss(model, teacher, student_prompts, teacher_prompts, completions, beta=0.0, temperature=1.0, clip=None,
              fused=True, stats=None, sampled_token=False, base_teacher=False) -> torch.Tensor:
    """The OPSD loss of one batch: the per-token divergence D(p_T || p_S) of Eq. 8 at every completion token,
    averaged over all the batch's completion tokens. The teacher reads teacher_prompts (problem and
    reference), the student student_prompts (the problem); both score the same completions. All three are
    lists of token-id lists, as sample returns them. `teacher` may be `model` itself; base_teacher=True runs
    it with its LoRA adapters off (the base model: the fixed teacher of a LoRA run). fused=True takes the
    fused path (opsd.py's section 6): the same value without (B, L, V) logits, for models whose logits are hidden @ W.T
    (logits_are_linear). sampled_token=True minimises sampled_token_loss instead. A dict given as stats
    receives the (unclipped) divergence and the clipped teacher mass."""
    forward = completion_hidden if fused else completion_logits  # (B, L, H) or (B, L, V), and the mask (B, L)
    # The teacher re-scores the student's tokens after its privileged prompt, under no_grad: it is a target,
    # not a second model being trained.
    teacher.eval()
    with torch.no_grad(), adapters_off(teacher, base_teacher):
        teacher_out, _ = forward(teacher, teacher_prompts, completions)
    # The student scores the same tokens after its own prompt, with gradients. (Train mode only switches on
    # gradient checkpointing: dropout is off for good, so that the two differ by their contexts alone.)
    disable_dropout(model).train()
    student_out, mask = forward(model, student_prompts, completions)
    completion_ids = pad_right(completions, model.device) if sampled_token else None  # (B, L)
    if not fused and not sampled_token:
        return divergence(student_out, teacher_out, mask, beta, temperature, clip, stats)
    if not fused:
        divergence(student_out.detach(), teacher_out, mask, beta, temperature, clip, stats)  # for the log only
        return sampled_token_loss(student_out, teacher_out, completion_ids, mask, temperature)
    return fused_divergence(student_out, teacher_out, lm_head(model).weight, mask, beta, temperature, clip,
                            teacher_weight=lm_head(teacher).weight, stats=stats, sampled_ids=completion_ids)


def sft_loss(model, student_prompts, references) -> torch.Tensor:
    """SFT: cross-entropy on the reference solutions from the student's prompt, -mean_n log p_S(y*_n).
    Off-policy: the student imitates tokens it did not write. No teacher."""
    disable_dropout(model).train()
    logits, mask = completion_logits(model, student_prompts, references)  # (B, L, V), (B, L)
    student_logp = token_log_probs(logits, pad_right(references, model.device))  # (B, L)
    return weighted_nll(student_logp, torch.ones_like(student_logp), mask)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO's advantages (B,) for rewards (B,) that come in groups of group_size rollouts of one problem: the
    reward minus its group's mean, over the group's standard deviation (+ 1e-4). A group whose rollouts all
    score the same gets zero advantage: it has nothing to teach."""
    grouped = rewards.view(-1, group_size)  # (problems, G)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


def grpo_loss(model, student_prompts, completions, advantages, temperature=1.0) -> torch.Tensor:
    """GRPO: -mean_n A log p_S(y_n), each rollout's tokens weighted by its advantage (group_advantages). One
    number per rollout, where OPSD has a distribution per token. No teacher."""
    disable_dropout(model).train()
    logits, mask = completion_logits(model, student_prompts, completions)  # (B, L, V), (B, L)
    student_logp = token_log_probs(logits, pad_right(completions, model.device), temperature)  # (B, L)
    return weighted_nll(student_logp, advantages[:, None].to(model.device), mask)


# ---------------------------------------------------------------------------------------------------------
# 5. One optimizer step on a batch of rollouts.

def train_step(model, teacher, optimizer, rollouts: Rollouts, cfg: "Config", lr: float, fused: bool) -> dict:
    """The loss of each micro-batch (cfg.method's) and its backward pass, the gradient norm clipped, one
    AdamW step at this step's learning rate lr, and an EMA teacher moved toward the student. fused: whether
    the OPSD loss takes the fused path (cfg.fused, where logits_are_linear allows it). Returns the statistics."""
    completions = rollouts.completions
    # Eq. 8 averages each rollout over its own tokens; the loss here is the sum over all completion tokens of
    # the step over their number, so every token weighs the same, and micro-batches weighted by their share
    # of the tokens add up to exactly the gradient of one big batch. all_sum: the counts of every torchrun
    # process (in one process, the counts themselves).
    n_tokens, n_rollouts = map(int, all_sum([sum(map(len, completions)), len(completions)], model.device))
    totals = dict(loss=0.0, rollout_acc=rollouts.rewards.sum().item() / n_rollouts,
                  truncated=rollouts.truncated.sum().item() / n_rollouts)
    if cfg.method == "grpo":  # groups whose rollouts all score the same teach nothing
        zero_std = (rollouts.rewards.view(-1, cfg.group_size).std(1) == 0).sum().item()
        totals["zero_std_groups"] = zero_std * cfg.group_size / n_rollouts
        advantages = group_advantages(rollouts.rewards, cfg.group_size)
    for i in range(0, len(completions), cfg.micro_batch_size):
        part, stats = slice(i, i + cfg.micro_batch_size), {}
        student_prompts = rollouts.student_prompts[part]
        if cfg.method == "opsd":
            loss = opsd_loss(model, teacher, student_prompts, rollouts.teacher_prompts[part], completions[part],
                             cfg.beta, cfg.temperature, cfg.clip, fused=fused, stats=stats,
                             sampled_token=cfg.sampled_token, base_teacher=cfg.teacher_decay == 1)
        elif cfg.method == "sft":  # the completions are the references
            loss = sft_loss(model, student_prompts, completions[part])
        else:
            loss = grpo_loss(model, student_prompts, completions[part], advantages[part], cfg.temperature)
        share = sum(map(len, completions[part])) / max(n_tokens, 1)  # this micro-batch's share of the step's tokens
        (loss * share).backward()
        for key, value in (("loss", loss.item()), *stats.items()):  # OPSD's: divergence, clipped mass, entropy
            totals[key] = totals.get(key, 0.0) + value * share
    if torch.distributed.is_initialized():  # torchrun: sum the gradients of the trained parameters of all ranks
        for p in optimizer.param_groups[0]["params"]:
            torch.distributed.all_reduce(p.grad)
    totals = dict(zip(totals, all_sum(list(totals.values()), model.device)))
    totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    bad = [f"the {key} is {value}" for key, value in totals.items() if not math.isfinite(value)]
    if bad:  # before the optimizer step: the weights stay those of the last good step
        raise FloatingPointError(f"{', '.join(bad)}: lower --lr or check the data (no step was taken)")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if 0 < cfg.teacher_decay < 1:
        update_ema(teacher, model, cfg.teacher_decay)
    return {**totals, "length": n_tokens / n_rollouts, "tokens": n_tokens,
            "generated": 0 if cfg.method == "sft" else n_tokens, "fused": fused}  # SFT samples nothing


@torch.no_grad()
def update_ema(teacher, model, decay: float):
    """An EMA teacher follows the student slowly: theta_T <- decay theta_T + (1 - decay) theta_S. Its weights
    are float32 (build_models): in bf16, a move of (1 - decay) x a small update would round away."""
    for t, s in zip(teacher.parameters(), model.parameters()):
        t.lerp_(s, 1 - decay)


def learning_rate(cfg: "Config", step: int) -> float:
    """AdamW's learning rate at a step: constant, or decayed linearly to 0 over cfg.steps. No warm-up, as in
    the official code, whose linear decay spans 30 epochs: over the paper's 100 steps it is constant."""
    return cfg.lr * (1 - step / cfg.steps) if cfg.lr_schedule == "linear" else cfg.lr


# ---------------------------------------------------------------------------------------------------------
# 6. The fused path: the same divergence from hidden states and the LM head, C tokens at a time, so that at
# most a (C, V) block of logits is alive, never (N, V). With Qwen3's V = 151,936, one float32 (N, V) tensor
# at N = 2,048 tokens is 1.2 GB, and the plain path keeps several of them.
#
# The gradient, derived. For one token let z be the student logits, s = log_softmax(z / T) (so p_S = exp s),
# t the teacher's log-probs, and l_v the per-vocabulary terms (divergence_terms). With g_v = dl_v / ds_v,
# zero where the clip caps l_v, and ds_v / dz_j = (delta_vj - p_S,j) / T, the chain rule gives
#     dL/dz_j = (g_j - p_S,j sum_v g_v) / T
# with g_v = -p_T,v (forward KL), p_S,v (s_v - t_v + 1) (reverse KL), (1 - beta) p_S,v (s_v - m_v) (JSD_beta,
# where the dm/ds terms cancel because beta p_T + (1 - beta) p_S = exp m). For logits z = h W^T (rows):
#     dL/dh = dL/dz W,    dL/dW = sum over tokens of dL/dz^T h.
# Both are computed in the forward pass, chunk by chunk; backward only scales them by the incoming gradient.
# Nothing is recomputed, and nothing of size (N, V) is ever stored.

def terms_and_grads(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float):
    """The per-vocabulary terms l_v of divergence_terms and their derivatives g_v = dl_v / ds_v, (C, V) each,
    written to share the work and to keep few (C, V) temporaries alive."""
    if beta == 0:  # l = p_T (t - s), g = -p_T
        g = teacher_logp.exp().neg_()
        return g * (student_logp - teacher_logp), g
    if beta == 1:  # l = p_S (s - t), g = p_S (s - t + 1) = l + p_S
        terms = student_logp.exp().mul_(student_logp - teacher_logp)
        return terms, student_logp.exp().add_(terms)
    # g = (1 - beta) p_S (s - m) and l = beta p_T (t - m) + g, with m the log of the mixture
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1 - beta))
    g = student_logp.exp().mul_(1 - beta).mul_(student_logp - mixture_logp)
    return teacher_logp.exp().mul_(beta).mul_(teacher_logp - mixture_logp).add_(g), g


def chunk_log_probs(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(hidden W^T / T), written out: the logits in the model's dtype (as its own LM head computes
    them), the rest in float32 (float64 if given). (C, H), (V, H) -> (C, V)."""
    z = hidden @ weight.T  # (C, V)
    z = z.to(torch.promote_types(z.dtype, torch.float32)).div_(temperature)
    # log p = z - log sum_v exp(z_v). Subtract the row's max first: exp cannot overflow, and the likeliest
    # token's log-prob is computed without cancellation (z - logsumexp(z) would lose it when |z| ~ 1e4).
    z.sub_(z.amax(-1, keepdim=True))
    return z.sub_(z.exp().sum(-1, keepdim=True).log_())


class FusedDivergence(torch.autograd.Function):
    """Sums over the N completion tokens (the rows `index` of the (M, H) hidden states) of the loss (the clipped
    divergence, or the sampled-token loss at sampled_ids), the unclipped divergence, the clipped mass, the entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, index, sampled_ids, beta, temperature, clip,
                chunk_size):
        grad_hidden = torch.zeros_like(hidden)  # (M, H): rows that are not completion tokens get zero
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 if given
        train_head = ctx.needs_input_grad[1]  # False for a frozen head (LoRA): no (V, H) gradient at all
        # On CUDA in bf16 (autocast, or bf16 weights) the head's gradient takes bf16 products with float32 sums
        # (addmm's out_dtype with a float32 result, torch >= 2.10); elsewhere float32 x float32
        low = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
        product_dtype = low if (hidden.is_cuda and dtype == torch.float32 and low in (torch.bfloat16, torch.float16)
                                and torch.__version__ >= (2, 10)) else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if train_head else None  # (V, H)
        sums = torch.zeros(4, dtype=dtype, device=hidden.device)  # loss, divergence, clipped mass, entropy
        for i in range(0, index.numel(), chunk_size):
            rows = index[i:i + chunk_size]  # (C,)
            h = hidden[rows]  # (C, H)
            student_logp = chunk_log_probs(h, weight, temperature)  # (C, V)
            teacher_logp = chunk_log_probs(teacher_hidden[rows], teacher_weight, temperature)  # (C, V)
            terms, g = terms_and_grads(student_logp, teacher_logp, beta)  # (C, V), (C, V)
            sums[1] += terms.sum()
            sums[3] -= student_logp.exp().mul_(student_logp).sum()
            if clip is not None:
                capped = terms > clip
                sums[2] += teacher_logp.exp().mul_(capped).sum()
                terms.clamp_(max=clip)
                g.masked_fill_(capped, 0)
            if sampled_ids is not None:  # l = -A s_y at the sampled token y, with A = t_y - s_y a constant
                y = sampled_ids[rows, None]  # (C, 1)
                advantage = teacher_logp.gather(-1, y) - student_logp.gather(-1, y)  # (C, 1)
                terms = -advantage * student_logp.gather(-1, y)
                g = torch.zeros_like(g).scatter_(-1, y, -advantage)  # g_y = -A, every other g_v = 0
            sums[0] += terms.sum()
            dz = g.sub_(student_logp.exp_().mul_(g.sum(-1, keepdim=True))).div_(temperature)  # (C, V): dL/dz
            grad_hidden[rows] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)  # (autocast may compute it in bf16)
            if train_head and product_dtype:  # dL/dW += dz^T h: bf16 products on tensor cores, float32 sums
                torch.addmm(grad_weight, dz.T.to(product_dtype), h.to(product_dtype), out_dtype=dtype, out=grad_weight)
            elif train_head:  # float32 x float32 (an in-place matmul ignores autocast): exact, slow on a GPU
                grad_weight.addmm_(dz.T, h.to(dtype))
        ctx.grads = grad_hidden, grad_weight.to(weight.dtype) if train_head else None
        return sums[0], sums[1], sums[2], sums[3]

    @staticmethod
    def backward(ctx, grad_loss, *_grad_statistics):
        # Scaled in place and handed over (no reference kept), so that autograd stores them as they are
        # rather than copying: a second (V, H) tensor would double the memory. The graph is used once.
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        return grad_hidden.mul_(grad_loss), None if grad_weight is None else grad_weight.mul_(grad_loss), *[None] * 8


CHUNK_BYTES = 2 ** 30  # for the (C, V) float32 tensors of a chunk, up to 8 alive at once: C = 220 at V = 151,936


def fused_divergence(student_hidden, teacher_hidden, weight, mask, beta=0.0, temperature=1.0, clip=None,
                     chunk_size=None, teacher_weight=None, stats=None, sampled_ids=None):
    """divergence(student_hidden @ weight.T, teacher_hidden @ teacher_weight.T, mask, ...) without ever
    materialising the logits. Hidden states (B, L, H) or (N, H), mask (B, L) or (N,), weight (V, H); the
    teacher's weight defaults to the student's. Gradients reach student_hidden and weight only. Given the
    completion ids (B, L) or (N,) as sampled_ids, the loss is sampled_token_loss instead (stats unchanged).
    chunk_size: tokens per chunk; by default as many as CHUNK_BYTES holds, large chunks for large matmuls
    (docs/fused.md: twice as fast at 512 tokens as at 32)."""
    H, V = student_hidden.size(-1), weight.size(0)
    chunk_size = chunk_size or max(1, CHUNK_BYTES // (8 * 4 * V))
    index = mask.reshape(-1).nonzero().squeeze(-1)  # (N,): the rows that are completion tokens
    target_weight = (weight if teacher_weight is None else teacher_weight).detach()  # a target: no gradient
    sampled_ids = None if sampled_ids is None else sampled_ids.reshape(-1)  # (M,)
    loss, divergence_sum, clipped_mass, entropy = FusedDivergence.apply(
        student_hidden.reshape(-1, H), weight, teacher_hidden.detach().reshape(-1, H), target_weight, index,
        sampled_ids, beta, temperature, clip, chunk_size)
    count = max(index.numel(), 1)
    if stats is not None:
        stats |= {"divergence": divergence_sum.item() / count, "clipped_mass": clipped_mass.item() / count,
                  "entropy": entropy.item() / count}
    return loss / count


def lm_head(model) -> torch.nn.Module:
    return model.get_output_embeddings()


def logits_are_linear(model) -> bool:
    """Whether the logits are hidden @ W.T, as fused_divergence assumes (why_not_linear says why not)."""
    return not why_not_linear(model)


@torch.no_grad()
def why_not_linear(model) -> str:
    """Why the model's logits are not hidden @ W.T for its LM head's W, as fused_divergence assumes ("" if
    they are): a bias, soft-capping, a logit scale. The config is asked about the known ones; the numbers are
    checked too, on a few tokens, in the model's own dtype (the same matmul as its head's) to its precision."""
    head = lm_head(model)
    rescaled = [f"{name} = {getattr(model.config, name)}" for name in ("final_logit_softcapping", "logit_scale",
                "logits_scaling") if getattr(model.config, name, None) not in (None, 1.0)]
    if rescaled or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return ", ".join(rescaled) or ("its LM head has a bias" if isinstance(head, torch.nn.Linear) else
                                       f"its LM head is a {type(head).__name__}")
    ids = torch.arange(min(16, model.config.vocab_size), device=model.device)[None]  # (1, 16)
    linear = F.linear(model.base_model(input_ids=ids).last_hidden_state, head.weight).float()  # (1, 16, V)
    logits = model(input_ids=ids).logits.float()  # (1, 16, V)
    linear = (logits - linear).abs().max() <= torch.finfo(head.weight.dtype).eps * (1 + logits.abs().max())
    return "" if linear else "its forward rescales them"


# =========================================================================================================
# The engineering: the settings, evaluation during training, torchrun, checkpoints, the loop and the CLI.

def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model, data, run
    model: str = option("tiny/model", "base model: a local path or a hub name")
    trust_remote_code: bool = option(False, "run the code of the model's own repository (only if you trust it)")
    dtype: str = option("auto", "compute dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16")
    dataset: str = option("builtin", "builtin, builtin_other (references in another style, answer first: "
                          "tiny/model_other), builtin_other_working_first, a preset (openthoughts: the paper's, "
                          "gsm8k, math), a hub data set or a JSON/JSONL/CSV/parquet file")
    question_column: str = option("", "column of the problems (default: the preset's, else 'question')")
    solution_column: str = option("", "column of the reference solutions (default: the preset's, else 'solution')")
    answer_column: str = option("", "column of the final answers (default: the preset's, else read from the solution)")
    eval_dataset: str = option("", "held-out problems (default: the built-in test split, or eval_size of --dataset)")
    eval_columns: str = option("", "--eval_dataset's question,solution,answer columns (default: its preset's)")
    max_prompt_tokens: int = option(0, "longest prompt (0: the model's context less max_new_tokens): a longer "
                                    "reference is cut in its middle, a problem still too long is skipped")
    out_dir: str = option("runs/opsd", "where metrics.jsonl, curves.png and the checkpoints go")
    resume: bool = option(False, "continue the run in out_dir from its last checkpoint")
    seed: int = option(0, "seed of the problem order, the sampling and the initialisation")
    # rollouts: one per problem, sampled from the student
    batch_size: int = option(32, "problems per step, group_size rollouts each; torchrun splits them (paper: 32)")
    micro_batch_size: int = option(32, "rollouts per forward pass (of each process); smaller accumulates gradients")
    max_new_tokens: int = option(40, "rollout length limit (paper: 1024)")
    temperature: float = option(1.0, "sampling temperature; the loss divides both logits by it too (paper: 1.1)")
    top_p: float = option(1.0, "nucleus sampling mass (paper: 0.95)")
    top_k: int = option(0, "sample among the k likeliest tokens; 0 keeps all (paper: 20)")
    fast_sampling: bool = option(False, "a static cache and a compiled decode step (GPUs; a CPU compiles for minutes)")
    # the objective
    method: str = option("opsd", "opsd, or a baseline: sft (cross-entropy on references) or grpo (reward 1 if right)")
    group_size: int = option(1, "rollouts per problem, side by side (grpo needs 2 or more; the paper's GRPO: 8)")
    beta: float = option(0.5, "0 forward KL(p_T||p_S) (paper v3), 1 reverse KL, between: JSD_beta (v1: 0.5)")
    clip: float | None = option(None, "cap on each per-vocabulary term of the divergence (paper v3: 0.05); none = off")
    sampled_token: bool = option(False, "the sampled-token loss, -(log p_T - log p_S)(y_n) log p_S(y_n), instead")
    fused: bool = option(True, "full-vocabulary divergence from hidden states, a chunk of tokens at a time")
    skip_tokens: int = option(0, "leave the first k completion tokens out of the loss (TRL's num_loss_tokens_to_skip): "
                              "template tokens that the two contexts render differently (data.render)")
    teacher_decay: float = option(1.0, "teacher EMA decay: 1 = fixed initial weights (paper), 0 = current weights")
    off_policy: bool = option(False, "a control: rollouts from the initial weights, not the student (needs "
                              "teacher_decay 1): what being on-policy buys")
    student_thinking: bool = option(False, "chat template thinking flag of the student prompt (paper's code: off)")
    teacher_thinking: bool = option(True, "chat template thinking flag of the teacher prompt (paper's code: on; "
                                    "flags that differ skew the first completion tokens: data.render)")
    # LoRA: low-rank adapters on the named linear layers; only they train
    lora_rank: int = option(0, "adapter rank; 0 trains every weight instead (paper: 64)")
    lora_alpha: float = option(128.0, "the adapters' update is alpha / rank * B A (paper: 128)")
    lora_targets: str = option("all", "linear layers with adapters, e.g. q_proj,v_proj; all: every one but the LM head")
    save_merged: bool = option(False, "with LoRA, checkpoints also hold merged/: the float32 model with the adapters "
                               "folded in (in bf16 weights most of a small update would round away)")
    gradient_checkpointing: bool = option(False, "recompute activations during backward: less memory, slower")
    # optimisation
    steps: int = option(700, "optimizer steps (paper: about 100)")
    lr: float = option(1e-3, "AdamW learning rate (paper, LoRA on Qwen3: 5e-6)")
    lr_schedule: str = option("linear", "constant, or linear decay to 0 over --steps (the paper's: about constant)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "clip the gradient norm to this (paper: 0.1)")
    # evaluation and checkpoints
    eval_every: int = option(100, "evaluate student and teacher on held-out problems every this many steps")
    eval_size: int = option(500, "held-out problems per evaluation (greedy, one completion each)")
    save_every: int = option(100, "write a checkpoint every this many steps (and at the end)")
    keep_last: int = option(0, "keep the newest this many checkpoints; 0 keeps all (to pick the best, as the paper)")

    def __post_init__(self):
        checks = {
            "beta must lie in [0, 1]": 0 <= self.beta <= 1,
            "temperature must be > 0 (rollouts are sampled)": self.temperature > 0,
            "top_p must lie in (0, 1]": 0 < self.top_p <= 1,
            "clip must be > 0, or none": self.clip is None or self.clip > 0,
            "teacher_decay must lie in [0, 1]": 0 <= self.teacher_decay <= 1,
            "dtype must be auto, float32 or bfloat16": self.dtype in ("auto", "float32", "bfloat16"),
            "with LoRA the teacher is the base (teacher_decay 1) or the live weights (0): an EMA needs weights of "
            "its own": self.lora_rank == 0 or self.teacher_decay in (0, 1),
            "lr, grad_clip must be > 0": self.lr > 0 and self.grad_clip > 0,
            "lr_schedule must be constant or linear": self.lr_schedule in ("constant", "linear"),
            "top_k, lora_rank, keep_last, max_prompt_tokens, skip_tokens must be >= 0": min(
                self.top_k, self.lora_rank, self.keep_last, self.max_prompt_tokens, self.skip_tokens) >= 0,
            "steps, max_new_tokens, eval_every, eval_size, save_every must be > 0": min(
                self.steps, self.max_new_tokens, self.eval_every, self.eval_size, self.save_every) > 0,
            "method must be opsd, sft or grpo": self.method in ("opsd", "sft", "grpo"),
            "skip_tokens must be < max_new_tokens (no token left to train on)": self.skip_tokens < self.max_new_tokens,
            "off_policy samples from the fixed teacher's weights: it needs method opsd and teacher_decay 1": (
                not self.off_policy or self.method == "opsd" and self.teacher_decay == 1),
            "grpo needs group_size >= 2 (one rollout has no advantage)": self.method != "grpo" or self.group_size > 1,
            "batch_size x group_size must be a positive multiple of micro_batch_size": min(
                self.micro_batch_size, self.batch_size, self.group_size) > 0 and (
                self.batch_size * self.group_size) % self.micro_batch_size == 0,
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))


def parse_config(argv=None) -> Config:
    """Every Config field is a flag (--help lists them); unknown flags and invalid values are errors."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        help = f.metadata["help"] + " (default: %(default)s)"
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            kind = (lambda s: None if s.lower() == "none" else float(s)) if f.type == float | None else f.type
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help)
    try:
        return Config(**vars(parser.parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))


def evaluate_both(model, teacher, tokenizer, examples, cfg: Config, teacher_acc: float | None = None) -> dict:
    """Held-out accuracy of the student (question alone) and of the teacher (with the reference), greedy,
    sampled batch_size problems at a time like the rollouts (so no larger KV cache). A teacher_acc given is
    the fixed teacher's, measured before: its weights never change. The baselines have no teacher: their
    teacher column is the current weights with the reference."""
    def accuracy(net, with_reference, thinking):
        return evaluate(net, tokenizer, examples, with_reference=with_reference, thinking=thinking,
                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, fast=cfg.fast_sampling)["avg@1"]

    student = accuracy(model, False, cfg.student_thinking)
    if teacher_acc is None:
        with adapters_off(teacher, cfg.method == "opsd" and cfg.teacher_decay == 1):
            teacher_acc = accuracy(teacher, True, cfg.teacher_thinking)
    return {"student_acc": student, "teacher_acc": teacher_acc}


def start_processes(cfg: Config) -> tuple[int, int]:
    """torchrun: one process (rank) per GPU, each holding the whole model and taking 1/world of each step's
    problems; train_step sums the gradients of all ranks. `python opsd.py` sets no WORLD_SIZE: rank 0 of 1,
    and nothing distributed is touched. Returns (rank, world)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if cfg.batch_size % world:
            raise ValueError(f"batch_size={cfg.batch_size} does not split over {world} processes: use a multiple")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",  # the others wait
                                             timeout=datetime.timedelta(hours=3))  # while rank 0 evaluates
        if rank > 0:  # rank 0 alone prints
            sys.stdout = open(os.devnull, "w")
    return rank, world


def all_sum(values: list[float], device) -> list[float]:
    """torchrun: the element-wise sum of `values` over the processes; in a single process, `values`."""
    if not torch.distributed.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def find_checkpoint(out: Path, cfg: Config) -> Path | None:
    """The checkpoint that --resume continues from (None for a new run), after checking the settings agree."""
    if (out / "latest").exists() and not cfg.resume:
        raise FileExistsError(f"{out} holds a run already: pass --resume to continue it, or another --out_dir")
    if cfg.resume and not (out / "latest").exists():
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint to continue: leave --resume out to start afresh")
    if not cfg.resume:
        return None
    checkpoint = out / (out / "latest").read_text()
    try:  # a file cut short (a full disk) would end in the loader's traceback
        [safe_open(weights, "pt") for weights in checkpoint.rglob("*.safetensors")]
    except SafetensorError as e:
        raise ValueError(f"--resume: {checkpoint} is damaged ({e}), and only the newest checkpoint keeps the "
                         "optimizer state: start a new run (another --out_dir)") from None
    saved = json.loads((checkpoint / "opsd_config.json").read_text())
    may_change = {"resume", "keep_last", "save_merged"} | ({"steps"} if cfg.lr_schedule == "constant" else set())
    changed = [f"--{k} ({saved[k]} there, {v} here)" for k, v in asdict(cfg).items()
               if k not in may_change and v != saved.get(k, v)]
    if changed:
        raise ValueError(f"{checkpoint} was trained with other settings: {', '.join(changed)}. Resume with the "
                         "run's own settings (--steps may change with --lr_schedule constant; a linear decay "
                         "ends at the run's own --steps)")
    return checkpoint


def save_checkpoint(out: Path, step: int, model, teacher, tokenizer, optimizer, cfg: Config):
    """step_N: what load_model loads and, in the newest, what --resume needs. Written to a temporary folder,
    then renamed, so that a crash never leaves half of one; `latest` names it. The older checkpoints keep
    their weights (all of them, or the newest cfg.keep_last) but lose the optimizer state and EMA teacher."""
    final, tmp = out / f"step_{step}", out / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = bool(lora_layers(model))
    if lora:  # the float32 adapters and the name of their base model: exactly the model that trained
        base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
        save_adapters(model, tmp, base, cfg.lora_rank, cfg.lora_alpha)
    merged = tmp / "merged" if lora else tmp  # its own folder: beside adapter_config.json, from_pretrained with
    if cfg.save_merged or not lora:  # peft installed would add the adapters to weights that hold them already
        model.save_pretrained(merged, state_dict=merged_state_dict(model) if lora else None)
    if cfg.save_merged and lora:  # float32 in config.json too, or from_pretrained would round them to bf16
        config = json.loads((merged / "config.json").read_text())
        (merged / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))
        tokenizer.save_pretrained(merged)
    tokenizer.save_pretrained(tmp)
    if 0 < cfg.teacher_decay < 1:  # an EMA teacher has weights of its own; the others are rebuilt
        teacher.save_pretrained(tmp / "teacher")
        tokenizer.save_pretrained(tmp / "teacher")
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp / "state.pt")
    (tmp / "opsd_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (out / "latest.tmp").write_text(final.name)
    os.replace(out / "latest.tmp", out / "latest")  # atomic: 'latest' names a complete checkpoint
    older = sorted((p for p in out.glob("step_*") if p.name[5:].isdigit() and int(p.name[5:]) < step),
                   key=lambda p: int(p.name[5:]))
    for i, old in enumerate(older):
        if cfg.keep_last and i < len(older) - (cfg.keep_last - 1):
            shutil.rmtree(old)
        else:  # only the newest is resumed from: the older ones keep their weights alone
            (old / "state.pt").unlink(missing_ok=True)
            shutil.rmtree(old / "teacher", ignore_errors=True)


def build_models(cfg: Config, checkpoint: Path | None):
    """The student (with adapters if cfg.lora_rank), the teacher, the tokenizer, the optimizer and the step to
    start from. The teacher is never trained: the initial weights (teacher_decay 1), the live ones (0) or an
    EMA. With LoRA or the live weights it is the student's own network (adapters off for the fixed one).
    Precision: what accumulates small updates is float32. With LoRA the frozen base keeps the compute dtype
    (cfg.dtype) and the float32 adapters train. Full fine-tuning keeps the student's weights in float32 (the
    master weights: AdamW's steps at lr 5e-6 are mostly below half a bf16 spacing) and computes in bf16 under
    autocast (train); its separate teacher, fixed or EMA, is float32 too, so that at step 0 the two differ by
    their contexts alone."""
    torch.manual_seed(cfg.seed)  # the same on every rank: the same LoRA initialisation
    lora = cfg.lora_rank > 0
    model, tokenizer = load_model(str(checkpoint if checkpoint and not lora else cfg.model),
                                  cfg.dtype if lora else "float32", cfg.trust_remote_code)
    if lora_layers(model) and not checkpoint:
        raise ValueError(f"{cfg.model} is a LoRA checkpoint of opsd: train from its base model, or continue its "
                         "run with --resume and that run's --out_dir")
    if lora and checkpoint:  # a resumed run: the adapters it saved, on the base weights
        load_adapters(model, checkpoint)
    elif lora:  # only the adapters train
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
    if lora:
        print(describe_lora(model))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora or cfg.teacher_decay == 0 or cfg.method != "opsd":  # the baselines only evaluate it
        teacher = model
    else:
        from_base = cfg.teacher_decay == 1 or checkpoint is None
        teacher = load_model(cfg.model if from_base else str(checkpoint / "teacher"), "float32",
                             cfg.trust_remote_code)[0]
        teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    if not checkpoint:
        return model, teacher, tokenizer, optimizer, 0
    state = torch.load(checkpoint / "state.pt", weights_only=True, map_location=model.device)
    optimizer.load_state_dict(state["optimizer"])
    print(f"resuming from {checkpoint} at step {state['step']}")
    return model, teacher, tokenizer, optimizer, state["step"]


def load_data(cfg: Config) -> tuple[list[Example], list[Example]]:
    """The training and held-out problems (loaded before the model, so that a bad data set fails fast)."""
    columns = dict(question_column=cfg.question_column, solution_column=cfg.solution_column,
                   answer_column=cfg.answer_column)
    train_set = load_examples(cfg.dataset, "train", seed=cfg.seed, **columns)
    if not all(ex.solution for ex in train_set):
        raise ValueError(f"{cfg.dataset} has problems without a reference solution, which the teacher needs: "
                         "name its column with --solution_column")
    if cfg.eval_dataset:  # its own columns: question,solution,answer
        eval_columns = dict(zip(columns, (cfg.eval_columns.split(",") + ["", ""])[:3]))
        test_set = load_examples(cfg.eval_dataset, "test", cfg.eval_size, cfg.seed, **eval_columns)
    elif cfg.dataset in BUILTIN:  # the built-in tasks have a test split
        test_set = load_examples(cfg.dataset, "test", cfg.eval_size, cfg.seed)
    else:  # a fixed random eval_size problems of the data set, kept out of training
        if len(train_set) < cfg.eval_size + cfg.batch_size:
            raise ValueError(f"{cfg.dataset} has {len(train_set)} problems: eval_size={cfg.eval_size} held out "
                             f"leave fewer than batch_size={cfg.batch_size} to train on. Lower --eval_size or "
                             "pass --eval_dataset")
        random.Random(0).shuffle(train_set)
        train_set, test_set = train_set[cfg.eval_size:], train_set[:cfg.eval_size]
    return train_set, test_set


def fit_to_context(cfg: Config, model, tokenizer, train_set, test_set) -> tuple[list[Example], list[Example]]:
    """The problems whose prompts, and rollouts, fit the model's context (data.fit_prompts)."""
    context = getattr(model.config, "max_position_embeddings", None) or math.inf
    limit = min(cfg.max_prompt_tokens or math.inf, context - cfg.max_new_tokens)  # each prompt and its rollout fit
    if limit <= 0:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context}: lower --max_new_tokens")
    train_set, test_set = (fit_prompts(examples, tokenizer, limit, cfg.student_thinking, cfg.teacher_thinking)
                           for examples in (train_set, test_set))
    if len(train_set) < cfg.batch_size or not test_set:
        raise ValueError(f"{len(train_set)} training and {len(test_set)} held-out problems fit in {limit} prompt "
                         f"tokens: at least batch_size={cfg.batch_size} and 1 are needed")
    if cfg.method == "sft":  # its completions are the references, cut at max_new_tokens (+ 1: the EOS)
        lengths = map(len, tokenizer([ex.solution for ex in train_set], add_special_tokens=False).input_ids)
        if cut := sum(n + 1 > cfg.max_new_tokens for n in lengths):
            print(f"warning: {cut} of {len(train_set)} reference solutions are cut at max_new_tokens="
                  f"{cfg.max_new_tokens}: SFT learns their beginnings only (raise --max_new_tokens)")
    if tokenizer.chat_template is None:
        print(f"{cfg.model} has no chat template: the prompts are plain text and the thinking flags do nothing")
    return train_set, test_set


def train(cfg: Config) -> list[dict]:
    """Runs OPSD (or a baseline: cfg.method) with the settings in cfg; returns the held-out evaluations."""
    t0 = time.time()
    rank, world = start_processes(cfg)
    out = Path(cfg.out_dir)
    checkpoint = find_checkpoint(out, cfg)
    train_set, test_set = load_data(cfg)
    print(json.dumps(asdict(cfg), indent=1))
    model, teacher, tokenizer, optimizer, start = build_models(cfg, checkpoint)
    train_set, test_set = fit_to_context(cfg, model, tokenizer, train_set, test_set)
    why = why_not_linear(model) if cfg.method == "opsd" and cfg.fused else ""
    fused = cfg.method == "opsd" and cfg.fused and not why
    if cfg.method == "opsd":
        print(f"the divergence takes the {'fused' if fused else 'plain'} path" + (
            f": this model's logits are not hidden @ W.T ({why})" if why else ""))
    out.mkdir(parents=True, exist_ok=True)  # nothing is written before the settings, model and data are sound
    metrics_path = out / "metrics.jsonl" if rank == 0 else Path(os.devnull)  # torchrun: rank 0 alone logs
    rows = map(json.loads, metrics_path.read_text().splitlines()) if checkpoint else []
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start))  # not after it

    def log(row):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # Full fine-tuning in bf16: float32 master weights (build_models), bf16 matmuls under autocast. A region
    # of its own for each step and each evaluation: autocast keeps its bf16 copies of the weights until the
    # region ends, and the optimizer step, the last thing in a step, changes the weights.
    bf16 = model.dtype == torch.float32 and resolve_dtype(cfg.dtype) == torch.bfloat16

    def mixed_precision():
        return torch.autocast(model.device.type, torch.bfloat16, enabled=bf16)

    fixed_teacher = {}  # its accuracy, once measured: a fixed teacher's weights never change

    def evaluate_and_log(done):
        if rank == 0:  # torchrun: rank 0 alone evaluates; the others wait
            with mixed_precision():
                result = {"step": done, **evaluate_both(model, teacher, tokenizer, test_set, cfg,
                                                        fixed_teacher.get("acc"))}
            if cfg.method == "opsd" and cfg.teacher_decay == 1:
                fixed_teacher["acc"] = result["teacher_acc"]
            log(result)
            tqdm.write(f"step {done:4d}: student {result['student_acc']:.1%}, teacher {result['teacher_acc']:.1%}")

    if start == 0:
        evaluate_and_log(0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.method, disable=rank > 0)
    for step in bar:
        step_start = time.time()
        # 1-2. The two prompts of each problem, and the student's rollouts. The problems and the noise depend
        #      on (seed, step) alone, so a resumed run sees the same; with torchrun each rank takes its share.
        step_seed = cfg.seed * 1_000_003 + step
        batch = random.Random(step_seed).sample(train_set, cfg.batch_size)[rank::world]
        generator = torch.Generator(model.device).manual_seed(step_seed * world + rank)
        with mixed_precision():
            # off_policy, a control: the initial weights write the rollouts, as if collected once before training
            with adapters_off(teacher, cfg.off_policy and teacher is model):
                rollouts = collect_rollouts(teacher if cfg.off_policy else model, tokenizer, batch, cfg, generator)
            # 3-5. Re-score them with the teacher, the per-token divergence, backward, clip and step.
            stats = train_step(model, teacher, optimizer, rollouts, cfg, learning_rate(cfg, step), fused)
        # 6. Log one line; evaluate and checkpoint every so often.
        seconds = time.time() - step_start
        row = {"step": step + 1, **stats, "seconds": seconds, "tokens_per_s": stats["tokens"] / seconds}
        if model.device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        log(row)
        shown = ("loss", "divergence", "entropy", "clipped_mass", "rollout_acc", "length", "truncated", "tokens_per_s")
        bar.set_postfix_str(" ".join(f"{key} {row[key]:.3g}" for key in shown if key in row))  # SFT: no divergence
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate_and_log(step + 1)
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out, step + 1, model, teacher, tokenizer, optimizer, cfg)
    if world > 1:  # torchrun
        torch.distributed.destroy_process_group()
    return summarize_run(metrics_path, len(test_set), t0) if rank == 0 else []


def summarize_run(metrics_path: Path, problems: int, t0: float) -> list[dict]:
    """Prints the table of held-out accuracies and draws the run's curves beside metrics.jsonl (plot.py);
    returns the accuracies."""
    evals = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if "student_acc" in r]
    print("\n  step | student, question alone | teacher, with reference")
    for r in evals:
        print(f"{r['step']:6d} | {r['student_acc']:23.1%} | {r['teacher_acc']:23.1%}")
    first, last, minutes = evals[0], evals[-1], (time.time() - t0) / 60
    print(f"student accuracy {first['student_acc']:.1%} -> {last['student_acc']:.1%} on {problems} held-out "
          f"problems (teacher with reference {last['teacher_acc']:.1%}), {minutes:.1f} min")
    try:
        print(f"curves: {plot_run(metrics_path.parent)}")
    except ImportError as e:  # matplotlib is optional: the run itself is done
        print(e)
    return evals


if __name__ == "__main__":
    try:
        train(parse_config())
    except (ValueError, OSError, FloatingPointError) as e:  # bad input: one line that says what to do, no traceback
        sys.exit(f"opsd.py: error: {e}")
