"""lora.py — LoRA by hand: low-rank adapters on nn.Linear layers, switched off for the KL reference, merged to save.

y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ, with W frozen and B starting at zero (so training starts
exactly at the base model). The base weight keeps its name, so a merged state dict has exactly the
original keys and a checkpoint loads with plain `from_pretrained`.
"""

import contextlib
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

# The language model's attention and MLP layers (the same names in both families), and the vision tower's
# MLPs, adapted only with include_vision: gate/up/down_proj in Qwen2.5-VL, linear_fc1/2 in Qwen3-VL (whose
# patch mergers, the projectors, name their layers the same and are adapted with them)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "linear_fc1", "linear_fc2")


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter; `lora_enabled = False` gives the base layer back."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=torch.float32)  # adapters train in fp32
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            a = self.lora_dropout(x).to(self.lora_A.dtype)
            y = y + ((a @ self.lora_A.T) @ self.lora_B.T * self.scaling).to(y.dtype)
        return y

    def merged_weight(self):
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)


def add_lora(model, r=64, alpha=32, dropout=0.05, targets=TARGETS, include_vision=False):
    """Replace the targeted nn.Linear layers (language model only by default) with LoRALinear and
    freeze every other parameter. Returns the number of adapted layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if child_name in targets and type(child) is nn.Linear and (include_vision or ".visual" not in f".{full}"):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                n += 1
    if n == 0:
        raise ValueError(f"no nn.Linear named {targets} found for LoRA")
    return n


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model):
    """The base model (the reference policy of the KL term): same weights, adapters off."""
    mods = lora_modules(model)
    for m in mods:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.lora_enabled = True


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                plain.weight.copy_(child.merged_weight())
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
                setattr(module, child_name, plain)
    return model


def merged_state_dict(model, state_dict=None):
    """The model's state dict with adapters folded in and adapter keys removed (original key names).
    `state_dict`: a full state dict gathered beforehand (FSDP), else the model's own."""
    sd = dict(state_dict if state_dict is not None else model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a, b = sd.pop(f"{name}.lora_A"), sd.pop(f"{name}.lora_B")
            w = sd[f"{name}.weight"]
            sd[f"{name}.weight"] = (w.float() + (b.float() @ a.float()) * m.scaling).to(w.dtype)
    return sd


def adapter_state_dict(model, state_dict=None):
    """Only the adapters' tensors (what `adapter.safetensors` holds)."""
    sd = state_dict if state_dict is not None else model.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in sd.items() if ".lora_" in k}


def adapter_config(model):
    """What `add_lora` needs to rebuild the same adapters (written as `adapter_config.json`)."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    r = mods[0][1].lora_A.shape[0]
    return {"r": r, "alpha": mods[0][1].scaling * r, "targets": sorted({n.rsplit(".", 1)[-1] for n, _ in mods}),
            "include_vision": any(".visual." in f".{n}." for n, _ in mods)}


def load_lora_weights(model, path):
    """Load `path/adapter.safetensors` into a model that already has the same adapters."""
    missing, unexpected = model.load_state_dict(load_file(os.path.join(path, "adapter.safetensors")), strict=False)
    if unexpected or any(".lora_" in k for k in missing):
        raise ValueError(f"{path}: adapter does not fit the model (unexpected {unexpected[:3]}, "
                         f"missing {[k for k in missing if '.lora_' in k][:3]})")
    return model


def load_adapter(model, path):
    """Add LoRA as described by `path/adapter_config.json` and load `path/adapter.safetensors`."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    add_lora(model, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg.get("dropout", 0.0), targets=tuple(cfg["targets"]),
             include_vision=cfg.get("include_vision", False))
    return load_lora_weights(model, path)
