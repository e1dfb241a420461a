"""vlm.py — the model side of every stage: load Qwen2.5-VL, encode prompts, sample, score, LoRA, save.

One small module shared by sft.py, mine_topk.py, grpo.py, evaluate.py and bench.py, so that every stage
builds prompts, samples and computes log-probs the same way.

- `load_model` / `Processor.from_pretrained`: a checkpoint from the Hub or a local folder, no
  `trust_remote_code`, no torchvision (the image processor + `<|image_pad|>` expansion + tokenization
  is done here instead of by `Qwen2_5_VLProcessor`).
- `Processor.encode`: chat-template prompts, left-padded, with pixels and explicit 3-D M-RoPE positions
  (`mrope_positions`): transformers 5.x must never infer positions by itself (it crashes or ignores left
  padding when decoding by hand).
- `sample_completions`: a hand-written KV-cache loop. Each distinct prompt is prefilled once (vision tower
  + prompt) and its cache replicated G times for the G samples of a GRPO group.
- `sequence_logprobs`: per-token log-probs of given completions in one forward over prompt ⊕ completion,
  with the vocabulary projection done in checkpointed chunks (the real vocabulary is 151k+).
- LoRA by hand (`add_lora`, `lora_disabled`, `merge_lora`), checkpoints in Hugging Face layout written
  atomically (`save_checkpoint`), training state without pickle (`save_train_state`), torchrun helpers
  (`init_distributed`), and a tiny Qwen2.5-VL (`build_tiny_model`) for tests and the toy world.

    python -m vlm tiny --out out/tiny              # build the tiny random model + tokenizer
    python -m vlm check --model out/tiny           # sampler vs model.generate, token for token
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data.records import load_image

DEFAULT_MAX_PIXELS = 256 * 28 * 28
DEFAULT_MIN_PIXELS = 4 * 28 * 28

# Qwen2.5-VL's chat template, restricted to what this codebase sends (a system turn, a user turn with
# one image and text, an assistant turn). Used when a checkpoint carries no template of its own.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


# ----------------------------------------------------------------------------------------------------
# distributed helpers: the same code runs under `torchrun` and plain `python`

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def init_distributed(device="auto"):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu") if device == "auto" else torch.device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local, dev)


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values, device="cpu"):
    """Sum a list of floats over ranks (a no-op without torch.distributed). Returns a list of floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def shard(items, d):
    """This rank's share of a list: every world_size-th item starting at its rank."""
    return items[d.rank::d.world_size]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def progress(start, total, d, desc):
    """A progress bar on rank 0; redrawn every 30 s instead of every second when output goes to a file."""
    from tqdm import tqdm
    return tqdm(range(start, total), initial=start, total=total, disable=not d.is_main, desc=desc,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


class ResumableShards:
    """Results of a (data-parallel) pass over a list of items, kept safe as they are produced.

    Each rank appends its finished rows to `{path}.shard{rank}of{world}.jsonl` (flushed and fsynced per
    batch), every row carrying `"key"`: its item's index. A rerun reads every shard file present
    (whatever world size wrote it) and skips finished keys, so an interrupted evaluation or mining run
    resumes where it stopped; a half-written last line from a crash is ignored. `merge()` (all ranks
    call it; rank 0 writes) puts the rows in key order into `path`, atomically, and removes the shards.
    """

    def __init__(self, path, d):
        self.path, self.d = path, d
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.mine = f"{path}.shard{d.rank}of{d.world_size}.jsonl"
        self.rows = self._read_all()
        self.done = {row["key"] for row in self.rows}

    def _read_all(self):
        folder, base = os.path.split(os.path.abspath(self.path))
        rows = []
        for name in sorted(os.listdir(folder)):
            if name.startswith(base + ".shard") and name.endswith(".jsonl"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    for line in f:
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:  # the line a crash cut short
                            pass
        return rows

    def append(self, rows):
        with open(self.mine, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(row["key"] for row in rows)

    def merge(self):
        """All rows, one per key in key order; rank 0 writes them to `path`. Returns the rows."""
        barrier()
        by_key = {row["key"]: row for row in self._read_all()}
        rows = [by_key[k] for k in sorted(by_key)]
        if self.d.is_main:
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        barrier()
        if self.d.is_main:
            folder, base = os.path.split(os.path.abspath(self.path))
            for name in os.listdir(folder):
                if name.startswith(base + ".shard") and name.endswith(".jsonl"):
                    os.remove(os.path.join(folder, name))
        barrier()
        return rows


# ----------------------------------------------------------------------------------------------------
# loading

def resolve_dtype(name):
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16}[name]


def load_model(path, device="cpu", dtype="fp32", attn="sdpa"):
    """Qwen2_5_VLForConditionalGeneration from a Hub id or a local folder, in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    path = str(path)
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1
    if looks_local and not os.path.isdir(path):  # else transformers says "Repo id must be in the form ..."
        raise FileNotFoundError(f"model folder not found: {path}")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def _image_processor_class():
    # transformers 5.x falls back to the PIL implementation without torchvision; name it directly so
    # no warning is printed (and older 5.x releases that lack the Pil class still work).
    try:
        from transformers import Qwen2VLImageProcessorPil as cls
    except ImportError:
        from transformers import Qwen2VLImageProcessor as cls
    return cls


@dataclass
class PromptBatch:
    """P left-padded prompts with their images, ready for a prefill or a training forward."""
    input_ids: torch.Tensor          # (P, T)
    attention_mask: torch.Tensor     # (P, T) 1 = real token, 0 = left padding
    mm_token_type_ids: torch.Tensor  # (P, T) 1 where the token is <|image_pad|>
    position_ids: torch.Tensor       # (3, P, T) M-RoPE (t, h, w) positions; 0 on padding
    pixel_values: torch.Tensor | None   # (sum of patches, C·t·p·p), images in row order
    image_grid_thw: torch.Tensor | None  # (P, 3) patch grid of each row's image

    def __len__(self):
        return self.input_ids.shape[0]

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return PromptBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    def repeat_interleave(self, g):
        """Each row g times in a row (the G samples of a group), images included."""
        if g == 1:
            return self
        pixels, grids = self.pixel_values, self.image_grid_thw
        if pixels is not None:
            chunks = pixels.split(grids.prod(-1).tolist())
            pixels = torch.cat([c for c in chunks for _ in range(g)])
            grids = grids.repeat_interleave(g, 0)
        return PromptBatch(self.input_ids.repeat_interleave(g, 0), self.attention_mask.repeat_interleave(g, 0),
                           self.mm_token_type_ids.repeat_interleave(g, 0),
                           self.position_ids.repeat_interleave(g, 1), pixels, grids)

    def select(self, rows):
        """The given rows (a list of indices, repeats allowed), without the left padding they all share."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        pixels, grids = self.pixel_values, self.image_grid_thw
        if pixels is not None:
            chunks = pixels.split(grids.prod(-1).tolist())
            pixels, grids = torch.cat([chunks[i] for i in idx.tolist()]), grids[idx.to(grids.device)]
        idx = idx.to(self.input_ids.device)
        mask = self.attention_mask[idx]
        start = int((mask.sum(0) > 0).long().argmax())  # first column some row uses
        return PromptBatch(self.input_ids[idx, start:], mask[:, start:], self.mm_token_type_ids[idx, start:],
                           self.position_ids[:, idx, start:], pixels, grids)

    def next_positions(self):
        """(3, P) position of the first generated token: the prompt's last position + 1."""
        return self.position_ids[:, :, -1] + 1


def mrope_positions(input_ids, attention_mask, image_grid_thw, image_token_id, merge_size):
    """Qwen2.5-VL's 3-D rotary positions (the same numbers as `model.model.get_rope_index`).

    Text tokens advance all three rows (t, h, w) by one. An image of t×h×w merged patches occupies a block
    whose rows follow the patch grid, starting at the current position; after it the text resumes at
    current + max(t, h, w). Padding keeps position 0. Returns (3, B, T) positions.
    """
    B, T = input_ids.shape
    positions = torch.zeros(3, B, T, dtype=torch.long)
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())
    for b in range(B):
        valid = attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[valid].tolist()
        rows, cur, i = [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                rows.append((cur, cur, cur))
                cur, i = cur + 1, i + 1
                continue
            t, h, w = next(grids)
            h, w = h // merge_size, w // merge_size
            rows += [(cur + ti, cur + hi, cur + wi) for ti in range(t) for hi in range(h) for wi in range(w)]
            cur, i = cur + max(t, h, w), i + t * h * w
        if rows:
            positions[:, b, valid] = torch.tensor(rows, dtype=torch.long).T
    return positions.to(input_ids.device)


class Processor:
    """Tokenizer + image processor + chat template: turns (image, question) pairs into a PromptBatch."""

    def __init__(self, tokenizer, image_processor, merge_size=2, system_prompt=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = merge_size
        self.system_prompt = system_prompt
        tok = tokenizer.convert_tokens_to_ids
        self.image_token_id = tok("<|image_pad|>")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tok("<|endoftext|>")
        self.eos_token_ids = sorted({tok("<|im_end|>"), tok("<|endoftext|>")})
        # tokens a completion must never contain: a sampled <|image_pad|> would make the scorer's forward
        # over prompt + completion count more image tokens than the image has features, and crash
        vision = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
        self.banned_token_ids = sorted({tok(t) for t in vision if t in tokenizer.get_vocab()})
        self.chat_template = tokenizer.chat_template or QWEN_CHAT_TEMPLATE

    @property
    def sampling_tokens(self):
        """The token arguments of `sample_completions` for this tokenizer: stop, pad, never sample."""
        return dict(eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                    banned_token_ids=self.banned_token_ids)

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=DEFAULT_MAX_PIXELS, system_prompt=None):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs = {}
        if min_pixels is not None or max_pixels is not None:
            size = {"shortest_edge": min_pixels or DEFAULT_MIN_PIXELS, "longest_edge": max_pixels}
            kwargs["size"] = size
        image_processor = _image_processor_class().from_pretrained(path, **kwargs)
        return cls(tokenizer, image_processor, getattr(image_processor, "merge_size", 2), system_prompt)

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def prompt_text(self, question, with_image=True):
        """The chat-template text of one user turn + the assistant header (one <|image_pad|> per image)."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, images, questions):
        """Left-padded PromptBatch for P prompts. `images`: PIL images or paths (or None: text only)."""
        if images is not None:
            images = [load_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
            vis = self.image_processor(images=images, return_tensors="pt")
            pixel_values, grids = vis["pixel_values"], vis["image_grid_thw"]
            n_tokens = (grids.prod(-1) // self.merge_size ** 2).tolist()
        else:
            pixel_values, grids, n_tokens = None, None, [0] * len(questions)
        rows = []
        for question, n in zip(questions, n_tokens):
            text = self.prompt_text(question, with_image=images is not None)
            # expand the single placeholder to one token per merged patch, as Qwen2_5_VLProcessor does
            text = text.replace("<|image_pad|>", "<|image_pad|>" * n, 1)
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding: generation appends on the right of every row
            input_ids[b, T - len(r):] = torch.tensor(r)
            attention_mask[b, T - len(r):] = 1
        mm_token_type_ids = (input_ids == self.image_token_id).long()
        positions = mrope_positions(input_ids, attention_mask, grids, self.image_token_id, self.merge_size)
        return PromptBatch(input_ids, attention_mask, mm_token_type_ids, positions, pixel_values, grids)

    def encode_completions(self, texts, device="cpu"):
        """Right-padded completion token ids + masks for targets/answers, each followed by <|im_end|>."""
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.float32)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        return ids.to(device), mask.to(device)

    def decode(self, completion_ids, completion_mask):
        """Completion texts: the masked tokens, without EOS and special tokens."""
        out = []
        for ids, m in zip(completion_ids.tolist(), completion_mask.tolist()):
            kept = [t for t, keep in zip(ids, m) if keep and t not in self.eos_token_ids]
            out.append(self.tokenizer.decode(kept, skip_special_tokens=True))
        return out


# ----------------------------------------------------------------------------------------------------
# sampling with a KV cache

@dataclass
class Rollout:
    completion_ids: torch.Tensor   # (P·G, L) sampled tokens, pad after the end
    completion_mask: torch.Tensor  # (P·G, L) float, 1 up to and including the first EOS
    logprobs: torch.Tensor         # (P·G, L) log-prob of each sampled token under softmax(logits / T)
    group_size: int


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


CACHE_KINDS = ("buffer", "static", "dynamic")


def new_kv_cache(config, kind="static", max_len=None):
    """A transformers KV cache for the prefill (and, for "static"/"dynamic", the decode steps too).
    "static": StaticCache, preallocated for `max_len` positions and written in place; "dynamic":
    DynamicCache, grown by torch.cat at every step (O(T^2) copying: most of a CPU decode step's time).
    The default "buffer" kind prefills into a DynamicCache and moves it into a KVBuffer."""
    from transformers import DynamicCache, StaticCache
    if kind == "static":
        return StaticCache(config=config, max_cache_len=max_len)
    if kind in ("dynamic", "buffer"):
        return DynamicCache(config=config)
    raise ValueError(f"unknown cache kind {kind!r} (one of {', '.join(CACHE_KINDS)})")


class KVBuffer:
    """The hand-written decode step's KV cache: for each layer, keys and values of shape
    (rows, kv_heads, max_len, head_dim), preallocated once and written in place, one position per step.
    Prompts are left-padded, so every row has filled the same `length` positions; `valid` (rows, max_len)
    says which of them a row attends to (not its left padding)."""

    def __init__(self, prefill_cache, attention_mask, max_len, group_size=1):
        """Move a prefilled DynamicCache in, each row repeated `group_size` times in a row."""
        rows, length = attention_mask.shape[0] * group_size, attention_mask.shape[1]
        self.keys, self.values = [], []
        for layer in prefill_cache.layers:
            for src, dst in ((layer.keys, self.keys), (layer.values, self.values)):
                buf = src.new_zeros(rows, src.shape[1], max_len, src.shape[3])
                buf[:, :, :length] = src.repeat_interleave(group_size, 0)
                dst.append(buf)
        self.valid = torch.zeros(rows, max_len, dtype=torch.bool, device=attention_mask.device)
        self.valid[:, :length] = attention_mask.bool().repeat_interleave(group_size, 0)
        self.length = length

    def select_rows(self, keep):
        """Keep only the rows `keep` (a LongTensor of row indices)."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.valid = self.valid.index_select(0, keep)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _decode_step_buffer(model, tokens, position_ids, kv):
    """One token per row through the language model by hand, over a KVBuffer: logits (B, V).

    The same computation as transformers' Qwen2.5-VL decoder layers for one new position (pre-norm
    attention with M-RoPE and grouped KV heads, then the gated MLP), calling the layers' own modules
    (so LoRA and FSDP2's gathered weights are used as they are) but none of their per-call machinery:
    no mask building, no cache objects, no kwargs plumbing (on the tiny model on a CPU, bench.py's
    StaticCache row against the default one: 5-25% of a step over this session's runs). Checked against
    the model's own forward (`_decode_step`) in tests/test_vlm.py. The cache is written in place at one
    position per step, the shape a compiled or CUDA-graph-captured step needs (the one function to
    replace for that)."""
    hf = unwrap(model)
    lm = hf.model.language_model
    x = lm.embed_tokens(tokens[:, None])                       # (B, 1, hidden)
    cos, sin = lm.rotary_emb(x, position_ids[..., None])       # M-RoPE: (B, 1, head_dim) each
    cos, sin = cos[:, None], sin[:, None]                      # broadcast over heads
    t = kv.length
    kv.valid[:, t] = True
    mask = kv.valid[:, None, None, :t + 1]                     # (B, 1, 1, t + 1): True = attend
    B = x.shape[0]
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(B, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, 1, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, 1, -1, attn.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv.keys[i][:, :, t] = k[:, :, 0]
        kv.values[i][:, :, t] = v[:, :, 0]
        # grouped-query attention (each KV head serves a group of query heads) without copying the cache
        o = F.scaled_dot_product_attention(q, kv.keys[i][:, :, :t + 1], kv.values[i][:, :, :t + 1], attn_mask=mask,
                                           scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    kv.length = t + 1
    return hf.lm_head(lm.norm(x)[:, -1])


def _map_cache_rows(cache, fn, dynamic_method, *args):
    """Apply `fn` to the batch dimension of every layer's keys and values: the G-fold replication and the
    dropping of finished rows. DynamicCache has a method for each; StaticCache has neither, so its
    preallocated (B, heads, max_len, dim) tensors are replaced (cheap next to a decode step)."""
    from transformers import StaticCache
    if not isinstance(cache, StaticCache):
        return getattr(cache, dynamic_method)(*args)
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        layer.batch_size = layer.keys.shape[0]


def repeat_cache_rows(cache, G):
    """Each row of the cache G times in a row (prefill once, sample G)."""
    _map_cache_rows(cache, lambda t: t.repeat_interleave(G, 0), "batch_repeat_interleave", G)


def select_cache_rows(cache, keep):
    """Keep only the rows `keep` (a LongTensor of row indices)."""
    if isinstance(cache, KVBuffer):
        return cache.select_rows(keep)
    _map_cache_rows(cache, lambda t: t.index_select(0, keep), "batch_select_indices", keep)


def draw(logp, generator=None):
    """One token per row from softmax(logp) (-inf: never), by inverse CDF: a single uniform per row
    against the cumulative probabilities. Seeded, no host sync, and ~20x cheaper on a CPU than drawing an
    exponential per vocabulary entry (the 'race' argmax(p / E))."""
    cdf = (logp - logp.max(-1, keepdim=True).values).exp().cumsum(-1)  # unnormalised: scaled by the total
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=logp.device, dtype=cdf.dtype) * total
    tok = torch.searchsorted(cdf, u, right=True)  # the first entry whose cumulative mass exceeds u
    # u rounds up to the total once in ~1e7 draws: take the last entry of positive probability then
    return torch.minimum(tok, (cdf < total).sum(-1, keepdim=True))[:, 0]


@functools.cache
def _cache_kwarg():
    """The forward argument that takes the KV cache: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    import inspect
    from transformers import Qwen2_5_VLForConditionalGeneration
    params = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def unwrap(model):
    """The Hugging Face model inside the training wrappers (DDP, Policy)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, Policy):
            model = model.vlm
        else:
            return model


def _decode_step(model, tokens, attention_mask, position_ids, cache):
    """One token per row through the model's own forward with a transformers cache: logits (B, V).

    The reference for `_decode_step_buffer` (cache_kind "static"/"dynamic"). A decode step has no image,
    so it goes straight to the language model and the LM head, skipping the multimodal wrapper's per-call
    work (image checks, position logic: the positions are given). Under FSDP2 the sampler runs inside
    `generation_mode`, where every shard is already gathered."""
    hf = unwrap(model)
    hidden = hf.model.language_model(input_ids=tokens[:, None], attention_mask=attention_mask,
                                     position_ids=position_ids[..., None], use_cache=True,
                                     **{_cache_kwarg(): cache}).last_hidden_state
    return hf.lm_head(hidden[:, -1])


@torch.no_grad()
def sample_completions(model, batch, *, group_size=1, max_new_tokens=256, temperature=1.0, top_p=1.0,
                       top_k=0, greedy=False, generator=None, eos_token_ids=(), pad_token_id=0,
                       banned_token_ids=(), compact_at=0.5, cache_kind="buffer"):
    """Sample `group_size` completions per prompt of `batch` (a PromptBatch on the model's device).

    Prefill each prompt once, replicate its KV cache G times, then decode token by token with explicit
    M-RoPE positions. Rows that emit an EOS stop; when the live rows fall to `compact_at` of the batch
    being decoded, finished rows are dropped from the cache so they stop costing compute.
    Returned log-probs are those of the *untruncated* softmax(logits / T) (top-k/top-p and
    `banned_token_ids`, e.g. `Processor.banned_token_ids`, only decide what is sampled), so they equal
    `sequence_logprobs` of the same tokens: r = 1 at the first GRPO update.
    `cache_kind`: "buffer" (a KVBuffer and the hand-written `_decode_step_buffer`), or the model's own
    forward at every step over transformers' "static" or "dynamic" cache (the reference paths).
    """
    G, P = group_size, len(batch)
    device = batch.input_ids.device
    max_len = batch.input_ids.shape[1] + max_new_tokens
    if cache_kind == "buffer" and "sliding_attention" in getattr(unwrap(model).config.text_config, "layer_types", ()):
        cache_kind = "static"  # the hand-written step has no sliding-window attention
    cache = new_kv_cache(model.config, cache_kind, max_len=max_len)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                mm_token_type_ids=batch.mm_token_type_ids, use_cache=True, logits_to_keep=1,
                **{_cache_kwarg(): cache})
    logits = out.logits[:, -1]
    mask, positions = batch.attention_mask, batch.next_positions()
    if cache_kind == "buffer":  # the G samples of a prompt share its prefill
        cache = KVBuffer(cache, mask, max_len, G)
    elif G > 1:
        repeat_cache_rows(cache, G)
    if G > 1:
        logits, mask = logits.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
        positions = positions.repeat_interleave(G, 1)
    N = P * G
    banned = torch.tensor(sorted(banned_token_ids), dtype=torch.long, device=device)
    tokens_out = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logp_out = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    mask_out = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device)
    rows = torch.arange(N, device=device)          # which output row each decoded row writes to
    done = torch.zeros(N, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        scaled = logits.float()
        if not greedy and temperature != 1.0:
            scaled = scaled / temperature
        logp_all = scaled.log_softmax(-1)
        # what may be sampled: log-probs differ from the logits by a constant per row, so they keep
        # the same order, the same top-k and (renormalised) the same top-p set
        pick = logp_all.index_fill(-1, banned, float("-inf")) if len(banned) else logp_all
        if greedy:
            tok = pick.argmax(-1)
        else:
            tok = draw(filter_logits(pick, top_k, top_p), generator)
        tok = tok.masked_fill(done, pad_token_id)
        live = (~done).float()
        tokens_out[rows, t] = tok
        logp_out[rows, t] = logp_all.gather(-1, tok[:, None])[:, 0] * live
        mask_out[rows, t] = live
        done = done | torch.isin(tok, eos)
        steps = t + 1
        n_live = int((~done).sum())  # host sync once per token; cheap next to the forward
        if n_live == 0 or t == max_new_tokens - 1:
            break
        if n_live <= compact_at * len(rows):  # drop finished rows from the batch and the cache
            keep = (~done).nonzero()[:, 0]
            select_cache_rows(cache, keep)
            rows, tok, done, mask, positions = rows[keep], tok[keep], done[keep], mask[keep], positions[:, keep]
        if cache_kind == "buffer":
            logits = _decode_step_buffer(model, tok, positions, cache)
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = _decode_step(model, tok, mask, positions, cache)
        positions = positions + 1
    return Rollout(tokens_out[:, :steps], mask_out[:, :steps], logp_out[:, :steps], G)


# ----------------------------------------------------------------------------------------------------
# scoring: per-token log-probs of given completions

def _token_logprobs(hidden, weight, targets, temperature, want_entropy):
    logits = F.linear(hidden, weight).float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    if not want_entropy:
        return logp, torch.zeros_like(logp)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy.detach()


def sequence_logprobs(model, batch, completion_ids, completion_mask, *, temperature=1.0, chunk_size=1024,
                      return_entropy=False):
    """log softmax(logits / T)[o_t] of each completion token, from one forward over prompt ⊕ completion.

    `batch` holds one row per completion (use `PromptBatch.repeat_interleave(G)` for groups). The
    vocabulary projection runs over chunks of `chunk_size` positions, each under activation
    checkpointing when gradients are on, so only one chunk of (rows × chunk × vocab) fp32 logits exists
    at a time, in the forward and in the backward. Returns (B, L) log-probs [and entropies].
    """
    B, Tp = batch.input_ids.shape
    L = completion_ids.shape[1]
    cmask = completion_mask.to(batch.attention_mask.dtype)
    completion_pos = batch.next_positions()[..., None] + torch.arange(L, device=completion_ids.device)
    hidden = model.model(
        input_ids=torch.cat([batch.input_ids, completion_ids], 1),
        attention_mask=torch.cat([batch.attention_mask, cmask], 1),
        position_ids=torch.cat([batch.position_ids, completion_pos], 2),
        # without mm_token_type_ids transformers silently falls back to 1-D positions inside the model
        mm_token_type_ids=torch.cat([batch.mm_token_type_ids, torch.zeros_like(completion_ids)], 1),
        pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw, use_cache=False,
    ).last_hidden_state[:, Tp - 1:Tp - 1 + L]  # the state before token t predicts token t
    weight = model.lm_head.weight
    logps, entropies = [], []
    for s in range(0, L, chunk_size):
        args = (hidden[:, s:s + chunk_size], weight, completion_ids[:, s:s + chunk_size], temperature,
                return_entropy)
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(_token_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _token_logprobs(*args)
        logps.append(lp)
        entropies.append(ent)
    logp = torch.cat(logps, 1) * completion_mask
    if return_entropy:
        return logp, torch.cat(entropies, 1) * completion_mask
    return logp


def text_generator(model, processor, max_new_tokens=16, batch_size=32):
    """A `generate_fn(list[str]) -> list[str]`: greedy text-only answers (the LLM verifier of reward.py)."""
    device = next(model.parameters()).device

    def generate(prompts):
        out = []
        for s in range(0, len(prompts), batch_size):
            batch = processor.encode(None, prompts[s:s + batch_size]).to(device)
            roll = sample_completions(model, batch, max_new_tokens=max_new_tokens, greedy=True,
                                      **processor.sampling_tokens)
            out += processor.decode(roll.completion_ids, roll.completion_mask)
        return out
    return generate


class Policy(nn.Module):
    """The model as training sees it, and the module that DDP / FSDP2 wrap.

    `policy(batch, completion_ids, completion_mask)` = `sequence_logprobs`; any other call (the sampler's
    prefill and decode steps) goes to the Hugging Face model. Both pass through this module's forward,
    so data-parallel wrappers see every call (FSDP2 gathers its root parameters there)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    @property
    def config(self):
        return self.vlm.config

    def forward(self, batch=None, completion_ids=None, completion_mask=None, temperature=1.0,
                return_entropy=False, **lm_kwargs):
        if batch is None:
            return self.vlm(**lm_kwargs)
        return sequence_logprobs(self.vlm, batch, completion_ids, completion_mask, temperature=temperature,
                                 return_entropy=return_entropy)


# ----------------------------------------------------------------------------------------------------
# LoRA, by hand

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ. The base weight keeps its name (`*.weight`), so the
    merged state dict has exactly the original keys; B starts at zero, so training starts at the base."""

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


def add_lora(model, r=64, alpha=32, dropout=0.05, targets=LORA_TARGETS, include_vision=False):
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


def lora_state_dict(model):
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def merged_state_dict(model, state_dict=None):
    """The model's state dict with adapters folded in and adapter keys removed (original key names)."""
    sd = dict(state_dict if state_dict is not None else model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a, b = sd.pop(f"{name}.lora_A"), sd.pop(f"{name}.lora_B")
            w = sd[f"{name}.weight"]
            sd[f"{name}.weight"] = (w.float() + (b.float() @ a.float()) * m.scaling).to(w.dtype)
    return sd


# ----------------------------------------------------------------------------------------------------
# checkpoints: Hugging Face layout, written atomically, no pickle

@contextlib.contextmanager
def atomic_dir(path):
    """Write a folder under a temporary name and rename it into place only when complete.

    A crash while writing leaves the previous folder at `path` untouched (plus a `*.partial-*` folder);
    replacing an existing folder goes through `path.old-*` so there is no moment with neither."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
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


def save_checkpoint(model, processor, path, *, state_dict=None, adapter_only=False, write_files=None):
    """Save `model` as a Hugging Face folder loadable by `from_pretrained` (LoRA merged), atomically.

    `state_dict`: a full state dict gathered beforehand (FSDP); `adapter_only`: write only
    `adapter.safetensors` + `adapter_config.json`; `write_files(tmpdir)`: extra files (training state) that
    must land in the same atomic rename."""
    with atomic_dir(path) as tmp:
        loras = lora_modules(model)
        if loras:
            sd = state_dict if state_dict is not None else model.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items() if ".lora_" in k},
                      os.path.join(tmp, "adapter.safetensors"))
            m = loras[0]
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump({"r": m.lora_A.shape[0], "alpha": m.scaling * m.lora_A.shape[0],
                           "targets": sorted({n.rsplit(".", 1)[-1] for n, x in model.named_modules()
                                              if isinstance(x, LoRALinear)}),
                           "include_vision": any(".visual." in f".{n}." for n, x in model.named_modules()
                                                 if isinstance(x, LoRALinear))}, f)
        if not adapter_only:
            sd = merged_state_dict(model, state_dict)
            model.save_pretrained(tmp, state_dict={k: v.detach().cpu().contiguous() for k, v in sd.items()})
            processor.save_pretrained(tmp)
        if write_files is not None:
            write_files(tmp)


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


def save_train_state(tmpdir, *, step, optimizer=None, optimizer_state=None, scheduler=None, generator=None,
                     extra=None):
    """Everything `--resume` needs besides the weights, as safetensors + JSON (nothing is pickled)."""
    tensors, meta = {}, {"step": step, "extra": extra or {}, "python_rng": random.getstate()[1]}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        tensors["rng.generator"] = generator.get_state()
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
    save_file(tensors, os.path.join(tmpdir, "train_state.safetensors"))
    with open(os.path.join(tmpdir, "train_state.json"), "w") as f:
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


def restore_rng(meta, tensors, generator=None):
    random.setstate((3, tuple(meta["python_rng"]), None))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])


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


# ----------------------------------------------------------------------------------------------------
# training helpers shared by sft.py and grpo.py

def configure_trainable(model, *, lora_r=0, lora_alpha=32, lora_dropout=0.05, lora_targets=LORA_TARGETS,
                        train_vision=False, gradient_checkpointing=False):
    """Choose what trains and keep it in fp32 (master weights; bf16 compute comes from autocast).

    LoRA (lora_r > 0): adapters on the language model (and on the vision tower with train_vision), all
    base weights frozen. Full fine-tuning: everything trains except the vision tower and its merger
    (the projector) unless train_vision. Returns the trainable parameters."""
    if lora_r > 0:
        add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets,
                 include_vision=train_vision)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(train_vision or ".visual." not in f".{name}.")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return params


def autocast(device, bf16):
    """bf16 autocast on CUDA (fp32 master weights, bf16 matmuls); a no-op on CPU or in fp32."""
    if bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_policy(model, d, *, fsdp=False, bf16=False):
    """(trainable, inner): `trainable` is what the loss calls (DDP / FSDP2 / the Policy itself); `inner` is
    the Policy, for sampling and saving. FSDP2 shards each decoder layer and vision block, then the root."""
    policy = Policy(model)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
            fully_shard(block, mp_policy=mp)
        fully_shard(policy, mp_policy=mp)
        return policy, policy
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None), policy
    return policy, policy


@contextlib.contextmanager
def generation_mode(policy):
    """Eval mode for sampling; under FSDP2 every shard is gathered once for the whole decode loop instead
    of at every token (the full model must fit one GPU for this, as it does for 3B/7B in bf16)."""
    from torch.distributed.fsdp import FSDPModule
    sharded = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    was_training = policy.training
    policy.eval()
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
        policy.train(was_training)


def make_optimizer(params, lr, weight_decay=0.0, betas=(0.9, 0.999)):
    """AdamW; weight decay on matrices only (not on biases, norms or LoRA-free vectors)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_schedule(optimizer, kind, warmup_steps, total_steps):
    """Linear warmup, then constant or cosine decay to zero at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(trainable, params, max_norm):
    """Clip to max_norm and return the total norm (a float; inf/nan when some gradient is not finite)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(norm)


def save_training_checkpoint(path, policy, processor, d, *, step, optimizer, scheduler, generator=None,
                             extra=None, fsdp=False):
    """A resumable checkpoint: HF weights (LoRA merged + adapter), optimizer, schedule, RNG, data position.
    Collective under FSDP (every rank calls it); rank 0 writes, atomically."""
    state_dict, osd = None, None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = {k.removeprefix("vlm."): v for k, v in get_model_state_dict(policy, options=opts).items()}
        osd = get_optimizer_state_dict(policy, optimizer, options=opts)
    if d.is_main:
        save_checkpoint(policy.vlm, processor, path, state_dict=state_dict, write_files=lambda tmp: save_train_state(
            tmp, step=step, optimizer=optimizer, optimizer_state=osd, scheduler=scheduler, generator=generator,
            extra=extra))
    barrier()


def load_training_state(path, policy, optimizer, scheduler, generator=None, fsdp=False):
    """Restore optimizer, schedule and RNG from a checkpoint (the weights are loaded before wrapping).
    Returns (step, extra)."""
    meta, osd, tensors = load_train_state(path)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(policy, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(osd)
    scheduler.load_state_dict(meta["scheduler"])
    restore_rng(meta, tensors, generator)
    return meta["step"], meta["extra"]


def prune_checkpoints(out_dir, keep):
    """Delete all but the newest `keep` step_* folders."""
    steps = sorted(x for x in os.listdir(out_dir) if x.startswith("step_") and "." not in x)
    for name in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


class JsonlLog:
    """Metrics appended as one JSON line per step (rank 0 only), flushed each time."""

    def __init__(self, path, d):
        self.f = open(path, "a", encoding="utf-8") if d.is_main else None

    def write(self, row):
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()


# ----------------------------------------------------------------------------------------------------
# a tiny Qwen2.5-VL for tests and the toy world

TINY_CORPUS = [
    "What is the name of the shape in this image? Choose one of the options.",
    "First think about the question inside <think> </think> tags, then give the final answer inside "
    "<answer> </answer> tags.",
    "You are a helpful assistant.", "system user assistant", "0 1 2 3 4 5 6 7 8 9 A B C D E F a b c d e",
]


def read_corpus(paths):
    """Texts to train the tiny tokenizer on: a JSONL file gives its records' question, target, label and
    options; any other file one text per line."""
    corpus = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in filter(str.strip, f):
                if path.endswith(".jsonl"):
                    r = json.loads(line)
                    corpus += [str(r.get(k, "")) for k in ("question", "target", "label")] + r.get("options", [])
                else:
                    corpus.append(line.rstrip("\n"))
    return corpus


def _tiny_phrases():
    from data import prompts
    questions = [prompts.open_question(ds).replace(prompts.FORMAT, "").strip() for ds in prompts.DOMAINS]
    return ["You are a helpful assistant.", prompts.FORMAT, "<think>", "</think>", "<answer>", "</answer>",
            "Answer with the option's letter.", " Options:", "Classify the image.",
            prompts.open_world_question().split(prompts.FORMAT)[1].strip()] + questions


def build_tiny_model(out_dir, seed=0, corpus=None, vocab_size=1024, image_size=56, text_layers=4,
                     hidden=128, vision_depth=2, vision_hidden=64, init_std=0.02, phrases=None, patch_size=14):
    """Create a few-million-parameter Qwen2.5-VL (random weights) and a byte-level BPE tokenizer with Qwen's
    special tokens and chat template, deterministically from `seed` and `corpus`, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus or TINY_CORPUS) + [QWEN_CHAT_TEMPLATE], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    # Phrases every prompt repeats verbatim become single (ordinary, decodable) tokens, so the tiny model
    # spends its compute on the image and the answer rather than on boilerplate.
    tokenizer.add_tokens(list(_tiny_phrases() if phrases is None else phrases))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads
    # (t, h, w) rotary sections in Qwen2.5-VL's proportions ([16, 24, 24] at head_dim 128), sum head_dim / 2
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64 * math.ceil(len(tokenizer) / 64), hidden_size=hidden,
                         intermediate_size=hidden * 3, num_hidden_layers=text_layers, num_attention_heads=heads,
                         num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=init_std),
        vision_config=dict(initializer_range=init_std, depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                           num_heads=2, out_hidden_size=hidden, patch_size=patch_size, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,  # as Qwen2.5-VL-3B
    )
    torch.manual_seed(seed)
    config.initializer_range = init_std
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    image_processor = _image_processor_class()(
        size={"shortest_edge": (2 * patch_size) ** 2, "longest_edge": image_size * image_size},
        patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
    return out_dir


# ----------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="build the tiny random Qwen2.5-VL and its tokenizer")
    t.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    t.add_argument("--seed", type=int, default=0, help="weights and nothing else depend on it")
    t.add_argument("--corpus", nargs="*", help="files to train the BPE on: JSONL records (question, target, "
                   "label, options) or plain text, one document per line")
    t.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size (upper bound)")
    t.add_argument("--image_size", type=int, default=56, help="max image side: max_pixels = side²")
    t.add_argument("--text_layers", type=int, default=4, help="decoder layers of the language model")
    t.add_argument("--hidden", type=int, default=128, help="width of the language model")
    c = sub.add_parser("check", help="sampler vs model.generate on a few synthetic prompts (greedy, fp32)")
    c.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    c.add_argument("--max_new_tokens", type=int, default=24)
    args = ap.parse_args()
    if args.cmd == "tiny":
        corpus = read_corpus(args.corpus or [])
        build_tiny_model(args.out, seed=args.seed, corpus=corpus or None, vocab_size=args.vocab_size,
                         image_size=args.image_size, text_layers=args.text_layers, hidden=args.hidden)
        model = load_model(args.out)
        print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    else:
        import numpy as np
        from PIL import Image
        model, proc = load_model(args.model), Processor.from_pretrained(args.model)
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(56, 56), (84, 56), (56, 112)]]
        batch = proc.encode(images, ["Hi", "What is the name of the shape?", "Name it, then explain why."])
        t0 = time.time()
        ours = sample_completions(model, batch, max_new_tokens=args.max_new_tokens, greedy=True,
                                  eos_token_ids=proc.eos_token_ids, pad_token_id=proc.pad_token_id)
        t1 = time.time()
        ref = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                             mm_token_type_ids=batch.mm_token_type_ids, do_sample=False,
                             max_new_tokens=args.max_new_tokens, pad_token_id=proc.pad_token_id)
        t2 = time.time()
        ref = ref[:, batch.input_ids.shape[1]:]
        same = all(ours.completion_ids[i, :int(ours.completion_mask[i].sum())].tolist()
                   == ref[i, :int(ours.completion_mask[i].sum())].tolist() for i in range(len(batch)))
        print(f"token-for-token equal to generate: {same}   ours {t1 - t0:.3f}s   generate {t2 - t1:.3f}s")


if __name__ == "__main__":
    main()
