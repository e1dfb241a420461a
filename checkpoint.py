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
from common import as_file, barrier, map_path_flags, run_flags


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
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never a NaN / inf model on disk, over a good checkpoint or anywhere else
            raise ValueError(f"not saving {path}: {len(bad)} tensors hold non-finite values ({bad[0]}, ...)")
        model.save_pretrained(tmp, state_dict={k: v.detach().cpu().contiguous() for k, v in sd.items()})
        processor.save_pretrained(tmp)
        make_portable(tmp)
        if write_files is not None:
            write_files(tmp)


def _rewrite_json(path, change):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(change(data), f, indent=2, ensure_ascii=False)


def portable_config(config):
    """config.json as transformers 5.x writes it -> one that transformers 4.5x also reads the same way.

    5.x keeps the rotary settings in text_config.rope_parameters and the tie flag at the top; 4.5x builds the
    text config from text_config alone (and answers the top-level tie flag from it), reading rope_scaling
    (whose mrope_section its attention indexes: None crashes every forward), rope_theta (default 1e6) and
    tie_word_embeddings (default False: a tied lm_head would be re-initialised). So those three go into
    text_config too, with the values 5.x uses; 5.x reads the file back the same (rope_theta must come with
    rope_scaling, or 5.x takes its own default theta). The Hub's own configs carry the same keys, rope_scaling
    in each family's form: {"type": "mrope", ...} for Qwen2.5-VL; {"rope_type": "default", ...,
    "mrope_interleaved": true} for Qwen3-VL, whose rotary embedding in 5.x would take "mrope" for a rope type
    and find no initialiser for it."""
    text = config.get("text_config")
    rope = (text or {}).get("rope_parameters") or {}
    if "mrope_section" in rope and rope.get("rope_type", "default") == "default":
        sections = list(rope["mrope_section"])
        if config.get("model_type") == "qwen3_vl":
            text["rope_scaling"] = {"rope_type": "default", "mrope_section": sections, "mrope_interleaved": True}
        else:
            text["rope_scaling"] = {"type": "mrope", "mrope_section": sections}
        text["rope_theta"] = rope["rope_theta"]
        text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return config


def portable_tokenizer_config(config):
    """tokenizer_config.json: 4.5x has no TokenizersBackend class (the tokenizer.json beside it is what a
    PreTrainedTokenizerFast loads) and wants extra_special_tokens as a dict, so a list goes under the key
    both versions read, additional_special_tokens."""
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    return config


def portable_preprocessor_config(config):
    """preprocessor_config.json: 4.5x's image processor reads the top-level min_pixels / max_pixels and not
    `size`; write both, with the same bounds (5.x lets the top-level keys win, so they must agree)."""
    size = config.get("size") or {}
    if "shortest_edge" in size and "longest_edge" in size:
        config["min_pixels"], config["max_pixels"] = size["shortest_edge"], size["longest_edge"]
    return config


def make_portable(folder):
    """Rewrite a saved folder's JSON files so that transformers 4.5x (what many serving stacks pin) loads the
    same model, tokenizer and image sizes as 5.x. Idempotent; the weights are untouched."""
    _rewrite_json(os.path.join(folder, "config.json"), portable_config)
    _rewrite_json(os.path.join(folder, "tokenizer_config.json"), portable_tokenizer_config)
    _rewrite_json(os.path.join(folder, "preprocessor_config.json"), portable_preprocessor_config)


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


def clean_partial(out_dir):
    """Put right what a crash mid-save left in out_dir: a `X.partial-PID` folder is incomplete (removed); a
    `X.old-PID` folder is the complete previous X, renamed just before the new one took its place (put back
    if X is missing, else removed). Returns what was done, one line each. Call it before any save starts."""
    done = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        path, stem = os.path.join(out_dir, name), name.split(".partial-")[0].split(".old-")[0]
        if ".partial-" in name:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            done.append(f"removed {path}: a checkpoint a crash left half-written")
        elif ".old-" in name and not os.path.exists(os.path.join(out_dir, stem)):
            os.rename(path, os.path.join(out_dir, stem))
            done.append(f"restored {os.path.join(out_dir, stem)} from {path}: a crash came between two renames")
        elif ".old-" in name:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}: the previous copy of a checkpoint that was replaced")
    return done


# the flags a resumed run may change: where it runs, what it keeps, how it is batched in memory, and --out
# itself (the checkpoint was found there: a run folder copied elsewhere resumes)
RESUMABLE_CHANGES = {"resume", "out", "device", "save_every", "keep", "skip_bad", "no_check_images",
                     "micro_batch_size", "prompts_per_call", "verifier_cache"}
# the flags that name files: compared as the files they name, not as the text typed


def _compared(settings):
    """What check_resume_args compares: path flags as files, and a file inside --out relative to --out (a
    copied run folder holds its own copy)."""
    out = as_file(settings["out"]) if settings.get("out") else None

    def file(value):
        path = as_file(value)
        inside = out is not None and (path + os.sep).startswith(out + os.sep)
        return os.path.join("<--out>", os.path.relpath(path, out)) if inside else path
    return map_path_flags(settings, file)


def check_resume_args(path, args, defaults=None):
    """Refuse to resume the checkpoint at `path` with other settings: the saved optimizer and schedule
    would silently override a new --lr, and a new --lora_r would not fit the saved adapter. Every flag
    but RESUMABLE_CHANGES must be as it was, paths compared as the files they name (`_compared`); the
    message lists each difference. `defaults` ({flag: the parser's default}): a flag newer than the
    checkpoint, absent from its saved args, was run as its default is, so it is compared as that value;
    without them such a flag differs from anything."""
    with open(os.path.join(path, "train_state.json")) as f:
        saved = json.load(f)["extra"].get("args") or {}
    predates = {k: v for k, v in run_flags(defaults or {}).items() if k not in saved}
    then, now = {**predates, **saved}, run_flags(args)
    then_cmp, now_cmp = _compared(then), _compared(now)
    diff = [k for k in sorted(set(then) | set(now))
            if k not in RESUMABLE_CHANGES and then_cmp.get(k, "(not set)") != now_cmp.get(k, "(not set)")]
    if diff:
        was = lambda k: (f"(not set: the checkpoint predates it, so its default {predates[k]})" if k in predates
                         else saved.get(k, "(not set)"))
        said = "; ".join(f"--{k} {was(k)} then, {now.get(k, '(not set)')} now" for k in diff)
        raise SystemExit(f"--resume: {path} was trained with other settings: {said}. Resume with the settings "
                         "it was started with, or give another --out for a new run.")


def prune_checkpoints(out_dir, keep):
    """Delete all but the newest `keep` step_* folders."""
    steps = sorted(x for x in os.listdir(out_dir) if x.startswith("step_") and "." not in x)
    for name in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# what sft.py and grpo.py call

def save_training_checkpoint(path, training, d, *, step, extra=None, fsdp=False):
    """A resumable checkpoint of a `trainer.Training`: HF weights (LoRA merged + adapter), optimizer,
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
    save_training_checkpoint(path, training, d, step=step, extra=dict(extra, args=run_flags(args)), fsdp=args.fsdp)
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
