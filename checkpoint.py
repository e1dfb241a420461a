"""checkpoint.py — checkpoints in Hugging Face layout, written atomically, resumable, never pickled.

A checkpoint folder (`OUT/step_000050`, `OUT/final`) is what `from_pretrained` loads: config.json,
model.safetensors (LoRA merged in), tokenizer and image-processor files; with LoRA also the adapter alone
(adapter.safetensors, adapter_config.json). Training checkpoints add what `--resume` needs: optimizer,
schedule and RNG state as train_state.safetensors + train_state.json (tensors and JSON, nothing pickled).
A folder is written under a temporary name and renamed into place when complete, so a crash mid-save
leaves the previous checkpoint intact.
"""

import contextlib
import json
import os
import random
import shutil

import torch
from safetensors.torch import load_file, save_file

import lora
from common import barrier


@contextlib.contextmanager
def atomic_dir(path):
    """Write a folder under a temporary name and rename it into place only when complete.

    A crash while writing leaves the previous folder at `path` untouched (plus a `*.partial-*` folder);
    replacing an existing folder goes through `path.old-*` so there is no moment with neither."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    for f in os.listdir(tmp):  # flush file contents before the rename makes them visible
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


def save_checkpoint(model, processor, path, *, state_dict=None, write_files=None):
    """Save `model` as a Hugging Face folder loadable by `from_pretrained` (LoRA merged), atomically.

    `state_dict`: a full state dict gathered beforehand (FSDP); `write_files(tmpdir)`: extra files (the
    training state) that must land in the same atomic rename."""
    with atomic_dir(path) as tmp:
        if lora.lora_modules(model):  # the adapter alone too, for loading onto a base model
            save_file(lora.adapter_state_dict(model, state_dict), os.path.join(tmp, "adapter.safetensors"))
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump(lora.adapter_config(model), f)
        sd = lora.merged_state_dict(model, state_dict)
        model.save_pretrained(tmp, state_dict={k: v.detach().cpu().contiguous() for k, v in sd.items()})
        processor.save_pretrained(tmp)
        if write_files is not None:
            write_files(tmp)


# ----------------------------------------------------------------------------------------------------
# training state

def save_train_state(folder, *, step, optimizer=None, optimizer_state=None, scheduler=None, extra=None):
    """Everything `--resume` needs besides the weights, as safetensors + JSON (nothing is pickled)."""
    tensors, meta = {}, {"step": step, "extra": extra or {}, "python_rng": random.getstate()[1]}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    osd = optimizer_state if optimizer_state is not None else (optimizer.state_dict() if optimizer else None)
    if osd is not None:
        meta["param_groups"] = osd["param_groups"]
        meta["state_keys"] = {}
        for pid, st in osd["state"].items():
            meta["state_keys"][str(pid)] = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                    meta["state_keys"][str(pid)][k] = "tensor"
                else:
                    meta["state_keys"][str(pid)][k] = v
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    save_file(tensors, os.path.join(folder, "train_state.safetensors"))
    with open(os.path.join(folder, "train_state.json"), "w") as f:
        json.dump(meta, f)


def load_train_state(path):
    """(meta, optimizer_state_dict or None, tensors) from a checkpoint written with `save_train_state`."""
    with open(os.path.join(path, "train_state.json")) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(path, "train_state.safetensors"))
    osd = None
    if "param_groups" in meta:
        state = {}
        for pid, keys in meta["state_keys"].items():
            key = int(pid) if pid.lstrip("-").isdigit() else pid
            state[key] = {k: tensors[f"opt.{pid}.{k}"] if v == "tensor" else v for k, v in keys.items()}
        osd = {"state": state, "param_groups": meta["param_groups"]}
    return meta, osd, tensors


def restore_rng(meta, tensors):
    random.setstate((3, tuple(meta["python_rng"]), None))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def latest_checkpoint(out_dir):
    """The complete checkpoint (`step_*` or `final`) with the highest step under out_dir, or None."""
    best, best_step = None, -1
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        state = os.path.join(out_dir, name, "train_state.json")
        if (name == "final" or name.startswith("step_")) and "." not in name and os.path.exists(state):
            with open(state) as f:
                step = json.load(f)["step"]
            if step > best_step:
                best, best_step = os.path.join(out_dir, name), step
    return best


def prune_checkpoints(out_dir, keep):
    """Delete all but the newest `keep` step_* folders."""
    steps = sorted(x for x in os.listdir(out_dir) if x.startswith("step_") and "." not in x)
    for name in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# what sft.py and grpo.py call

def save_training_checkpoint(path, training, d, *, step, extra=None, fsdp=False):
    """A resumable checkpoint of a `vlm.Training`: HF weights (LoRA merged + adapter), optimizer,
    schedule, RNG, `extra` (data position, counters, the run's arguments). Collective under FSDP (every
    rank calls it: the full state dicts are gathered); rank 0 writes, atomically."""
    state_dict, osd = None, None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = {k.removeprefix("vlm."): v
                      for k, v in get_model_state_dict(training.policy, options=opts).items()}
        osd = get_optimizer_state_dict(training.policy, training.optimizer, options=opts)
    if d.is_main:
        save_checkpoint(training.policy.vlm, training.processor, path, state_dict=state_dict,
                        write_files=lambda tmp: save_train_state(
                            tmp, step=step, optimizer=training.optimizer, optimizer_state=osd,
                            scheduler=training.scheduler, extra=extra))
    barrier()


def save_if_due(training, args, d, step, total_steps, extra):
    """After optimizer step `step` (1-based): every --save_every steps a `step_*` checkpoint (keeping
    the newest --keep), and `final` at the end, loadable and resumable like the others."""
    last = step == total_steps
    if not last and not (args.save_every and step % args.save_every == 0):
        return
    path = os.path.join(args.out, "final" if last else f"step_{step:06d}")
    save_training_checkpoint(path, training, d, step=step, extra=dict(extra, args=vars(args)), fsdp=args.fsdp)
    if d.is_main:
        prune_checkpoints(args.out, args.keep)


def load_training_state(path, training, fsdp=False):
    """Restore optimizer, schedule and RNG from a checkpoint (the weights are loaded before wrapping).
    Returns (step, extra)."""
    meta, osd, tensors = load_train_state(path)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(training.policy, training.optimizer, osd,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        training.optimizer.load_state_dict(osd)
    training.scheduler.load_state_dict(meta["scheduler"])
    restore_rng(meta, tensors)
    return meta["step"], meta["extra"]
