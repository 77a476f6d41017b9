"""lora.py: LoRA (Hu et al., 2021) written out; checkpoints in the format of peft, which is not needed to run.

A frozen linear layer W gets a trainable low-rank update,
    y = W x + (alpha / r) B A x,    A (r, in) random, B (out, r) zero,
so that training starts exactly at the base model; OPSD's fixed teacher is this network with its adapters off
(`adapters_off`), no second copy of the weights. Adapters and merged weights are float32 whatever the model's dtype:
at a small learning rate the update is about one bf16 step of W, which W + (alpha / r) B A in bf16 would mostly lose.
Owns: wrapping linear layers, switching the adapters off, saving them in PEFT's format (with their base model's
name), loading them, merging.
Leaves out: adapter dropout, DoRA and IA3, quantised base weights, adapters outside linear layers (MoE experts: frozen).
"""

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

LINEAR = (torch.nn.Linear, Conv1D)  # GPT-2's Conv1D is a linear layer too, its weight stored as (in, out)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a checkpoint's adapters, as peft names them
PLAIN = {"peft_type", "task_type", "base_model_name_or_path", "revision", "peft_version", "inference_mode", "r",
         "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "fan_in_fan_out", "megatron_core",
         "runtime_config", "qalora_group_size", "auto_mapping"}  # settings of peft's that leave y = W x + s B A x
PLAIN_VALUES = [("bias", "none"), ("init_lora_weights", True), ("init_lora_weights", "gaussian")]


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear | Conv1D, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        out_features, in_features = base.weight.shape[::1 if isinstance(base, torch.nn.Linear) else -1]
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, device=base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, device=base.weight.device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scale).to(y.dtype)
        return y

    def merged_weight(self) -> torch.Tensor:
        update = self.scale * self.lora_B @ self.lora_A  # (out, in)
        return self.base.weight.float() + (update if isinstance(self.base, torch.nn.Linear) else update.T)  # float32


def add_lora(model, rank: int, alpha: float, targets: list[str]):
    """Wraps the linear layers named in targets (q_proj, ...; "all": all but the LM head), freezes the rest, and
    names the weights that cannot take adapters (not linear layers)."""
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    layers = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, LINEAR) and child is not head]
    names = sorted({name for _, name, _ in layers})
    if set(targets) - set(names) - {"all"} or not names:
        raise ValueError(f"no linear layer is named {sorted(set(targets) - set(names))}; this model's are {names}: "
                         "set --lora_targets (all: every one but the LM head)")
    for parent, name, child in layers:
        if name in targets or "all" in targets:
            setattr(parent, name, LoRALinear(child, rank, alpha))
    frozen = {n: p for n, p in model.named_parameters() if p.dim() > 1 and ".lora_" not in n
              and not isinstance(model.get_submodule(n.rpartition(".")[0]), (*LINEAR, torch.nn.Embedding))}
    if frozen:  # e.g. the experts of a mixture of experts, stored as one (experts, out, in) tensor
        kinds = sorted({".".join(n.split(".")[-2:]) for n in frozen})
        print(f"warning: {len(frozen)} weights ({sum(p.numel() for p in frozen.values()):,} parameters) are not "
              f"linear layers, so they get no adapters and stay frozen: {', '.join(kinds)}")


def lora_layers(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def describe_lora(model) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"LoRA on {len(lora_layers(model))} layers ({', '.join(names)}): {trainable:,} trainable parameters, "
            f"{trainable / sum(p.numel() for p in model.parameters()):.2%} of all")


@contextlib.contextmanager
def adapters_off(model, off: bool = True):
    """Runs the base model (the fixed teacher) inside the block; off=False leaves the adapters as they are. On
    exit they are as they were before it, so blocks nest. A model without adapters is unchanged."""
    before = {layer: layer.enabled for layer in lora_layers(model)}
    for layer in before:
        layer.enabled = layer.enabled and not off
    try:
        yield
    finally:
        for layer, enabled in before.items():
            layer.enabled = enabled


def adapter_state(model) -> dict:
    return {name: value for name, value in model.state_dict().items() if ".lora_" in name}


def save_adapters(model, folder: Path, base_model: str, rank: int, alpha: float):
    """PEFT's format (peft's PeftModel.from_pretrained and vLLM load it): the adapters of a module named X as
    base_model.model.X.lora_A.weight and .lora_B.weight, the settings in adapter_config.json."""
    state = {f"base_model.model.{name}.weight": value.contiguous() for name, value in adapter_state(model).items()}
    save_file(state, folder / WEIGHTS)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": alpha, "target_modules": sorted({name.split(".")[-2] for name in adapter_state(model)}),
              "lora_dropout": 0.0, "bias": "none", "inference_mode": True,
              "fan_in_fan_out": any(isinstance(layer.base, Conv1D) for layer in lora_layers(model))}
    (folder / CONFIG).write_text(json.dumps(config, indent=1))


def load_adapters(model, folder: Path):
    """Adds the adapters saved in folder (PEFT's format, plain LoRA) to model."""
    config = json.loads((folder / CONFIG).read_text())
    other = [k for k, v in config.items() if v and k not in PLAIN and (k, v) not in PLAIN_VALUES]  # DoRA, PiSSA...
    if config.get("peft_type") != "LORA" or other:
        raise ValueError(f"the adapters in {folder} are not plain LoRA ({other or config.get('peft_type')}): use peft")
    state = {key.removeprefix("base_model.model.").removesuffix(".weight"): value
             for key, value in load_file(folder / WEIGHTS, device=str(model.device)).items()}
    add_lora(model, config["r"], config["lora_alpha"], sorted({key.split(".")[-2] for key in state}))
    result = model.load_state_dict(state, strict=False)  # strict=False: the base weights are not in it
    if result.unexpected_keys or any(".lora_" in key for key in result.missing_keys):
        raise ValueError(f"the adapters in {folder} do not fit this model: {result.unexpected_keys[:3]} "
                         f"{[k for k in result.missing_keys if '.lora_' in k][:3]}")


def merged_state_dict(model) -> dict:
    """The float32 weights with the adapters folded in, named as in the base model: loadable without opsd."""
    state = {k.replace(".base.", "."): v.float() if v.is_floating_point() else v
             for k, v in model.state_dict().items() if ".lora_" not in k}
    merged = {f"{name}.weight": m.merged_weight() for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return state | merged
