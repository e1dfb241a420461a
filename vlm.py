"""vlm.py — the model side of every stage: load a Qwen2.5-VL or Qwen3-VL, turn (image, question) into prompts,
score, set up training.

- `load_model` / `Processor.from_pretrained`: a checkpoint from the Hub or a local folder, the same path
  for the real models and the tiny ones of the tests, the family read from its config (`FAMILIES`: the
  few things that differ); no `trust_remote_code`, no torchvision (the image processor + `<|image_pad|>`
  expansion + tokenization is done here instead of by Qwen2_5_VLProcessor / Qwen3VLProcessor).
- `Processor.encode` -> `PromptBatch`: chat-template prompts, left-padded, with pixels and explicit 3-D
  M-RoPE positions (`mrope_positions`): transformers 5.x must never infer positions by itself (it crashes
  or ignores left padding when decoding by hand).
- `sequence_logprobs`: per-token log-probs of given completions in one forward over prompt ⊕ completion,
  the vocabulary projection in checkpointed chunks (the real vocabulary is 151k+). `Policy` is the module
  that training calls and data-parallel wrappers wrap.
- `setup_training`: what sft.py and grpo.py share: load → choose what trains → DDP / FSDP2 → optimizer and
  schedule → resume.
Sampling lives in engine.py, LoRA in lora.py, checkpoints in checkpoint.py.
"""

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import lora
from common import (Dist, barrier, fraction, nonnegative_float, nonnegative_int, positive_float, print0,
                    resolve_dtype)
from data.records import load_image
from engine import sample_completions

# The chat templates of the two families, restricted to what this codebase sends (a system turn, a user
# turn with one image and text, an assistant turn). Used when a checkpoint carries no template of its own.
# They differ in one thing: Qwen2.5-VL adds a default system turn when the messages have none, Qwen3-VL
# does not (tests/test_vlm.py renders every prompt against each family's Hub template).
_CHAT_TURN = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
)
_GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
QWEN25_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + _CHAT_TURN + "{% endfor %}" + _GENERATION_PROMPT
)
QWEN3_CHAT_TEMPLATE = "{% for message in messages %}" + _CHAT_TURN + "{% endfor %}" + _GENERATION_PROMPT
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


# ----------------------------------------------------------------------------------------------------
# loading: the two families

@dataclass(frozen=True)
class Family:
    """What this codebase needs to know about a model family beyond its config. The rest is one code path:
    the special tokens and their ids, the module names (`model.model.visual.blocks`,
    `model.model.language_model.layers`, q/k/v/o and gate/up/down projections), the image processor class
    and the 3-D positions are the same. What differs inside the model (Qwen3-VL: per-head q/k RMSNorm,
    interleaved M-RoPE, DeepStack features added after the first decoder layers, a learned vision position
    embedding) is left to transformers' modules, which every forward calls; the one place that rebuilds a
    layer by hand, engine.decode_step_buffer, applies the q/k norm itself."""
    model_class: str         # transformers' class, by name
    config_class: str
    chat_template: str       # for a checkpoint that carries none
    patch_size: int          # a visual token covers (patch_size · 2)² pixels: 28² (Qwen2.5-VL), 32² (Qwen3-VL)


FAMILIES = {  # keyed by config.model_type
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", QWEN25_CHAT_TEMPLATE,
                         patch_size=14),
    "qwen3_vl": Family("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", QWEN3_CHAT_TEMPLATE, patch_size=16),
}


def family(config):
    """The Family of a model's config; another model type is refused by name."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"model_type {config.model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[config.model_type]


def model_class(config):
    """transformers' ...ForConditionalGeneration class of a config's family."""
    import transformers
    return getattr(transformers, family(config).model_class)


def load_model(path, device="cpu", dtype="fp32", attn="sdpa"):
    """Qwen2.5-VL or Qwen3-VL (by the checkpoint's config) from a Hub id or a local folder, in eval mode."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    path = str(path)
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1
    if looks_local and not os.path.isdir(path):  # else transformers says "Repo id must be in the form ..."
        raise FileNotFoundError(f"model folder not found: {path}")
    cls = model_class(AutoConfig.from_pretrained(path))
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def image_processor_class():
    # the same class for both families (Qwen3-VL's preprocessor config sets patch 16 and its mean/std);
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

    def _image_chunks(self):
        return self.pixel_values.split(self.image_grid_thw.prod(-1).tolist())

    def repeat_interleave(self, g):
        """Each row g times in a row (the G samples of a group), images included."""
        return self.select([i for i in range(len(self)) for _ in range(g)]) if g > 1 else self

    def select(self, rows):
        """The given rows (a list of indices, repeats allowed), without the left padding they all share."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        pixels, grids = self.pixel_values, self.image_grid_thw
        if pixels is not None:
            chunks = self._image_chunks()
            pixels, grids = torch.cat([chunks[i] for i in idx.tolist()]), grids[idx.to(grids.device)]
        idx = idx.to(self.input_ids.device)
        mask = self.attention_mask[idx]
        start = int((mask.sum(0) > 0).long().argmax())  # first column some row uses
        return PromptBatch(self.input_ids[idx, start:], mask[:, start:], self.mm_token_type_ids[idx, start:],
                           self.position_ids[:, idx, start:], pixels, grids)

    @staticmethod
    def cat(batches):
        """One batch of every row of `batches`, in order, left-padded to the widest."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.input_ids.shape[1] for b in batches)
        lpad = lambda t: F.pad(t, (width - t.shape[-1], 0), value=0)
        images = [b for b in batches if b.pixel_values is not None]
        return PromptBatch(torch.cat([lpad(b.input_ids) for b in batches]),
                           torch.cat([lpad(b.attention_mask) for b in batches]),
                           torch.cat([lpad(b.mm_token_type_ids) for b in batches]),
                           torch.cat([lpad(b.position_ids) for b in batches], 1),
                           torch.cat([b.pixel_values for b in images]) if images else None,
                           torch.cat([b.image_grid_thw for b in images]) if images else None)

    def next_positions(self):
        """(3, P) position of the first generated token: the prompt's last position + 1."""
        return self.position_ids[:, :, -1] + 1


def mrope_positions(input_ids, attention_mask, image_grid_thw, image_token_id, merge_size):
    """The 3-D rotary positions of both families (the same numbers as `model.model.get_rope_index`).

    Text tokens advance all three rows (t, h, w) by one. An image of t×h×w merged patches occupies a block
    whose rows follow the patch grid, starting at the current position; after it the text resumes at
    current + max(t, h, w) (Qwen3-VL writes max(h, w): the same, as an image has t = 1). Padding keeps
    position 0. Returns (3, B, T) positions. How the rows rotate the head dimensions (contiguous blocks in
    Qwen2.5-VL, interleaved in Qwen3-VL) is the model's rotary embedding's business, not the positions'.
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
    """Tokenizer + image processor + chat template: turns (image, question) pairs into a PromptBatch.
    `model_family`: the model's Family; only its chat template is used, when the tokenizer has none."""

    def __init__(self, tokenizer, image_processor, merge_size=2, system_prompt=None,
                 model_family=FAMILIES["qwen2_5_vl"]):
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
        self.chat_template = tokenizer.chat_template or model_family.chat_template

    @property
    def sampling_tokens(self):
        """The token arguments of `engine.sample_completions` for this tokenizer: stop, pad, never sample."""
        return dict(eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                    banned_token_ids=self.banned_token_ids)

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=None, system_prompt=None):
        """The checkpoint's tokenizer and image processor. Images are resized to an area between
        min_pixels and max_pixels; None keeps the checkpoint's own bound (`save_pretrained` writes the
        bounds in use, so a model trained at one size is evaluated at that size). A visual token covers
        `token_pixels` of them: the same bounds give Qwen3-VL (32² px a token) fewer tokens than
        Qwen2.5-VL (28²)."""
        from transformers import AutoConfig, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError):  # a folder of tokenizer and image-processor files alone: no model type
            config = None
        model_family = family(config) if config is not None else FAMILIES["qwen2_5_vl"]
        image_processor = image_processor_class().from_pretrained(path)
        lo, hi = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]
        # set after loading, not passed to from_pretrained: a config in the Hub's form (top-level
        # min_pixels / max_pixels keys) would override a `size` given there
        hi = hi if max_pixels is None else max_pixels
        # a max below the checkpoint's min lowers the min too (Qwen3-VL's files ask for 64 tokens at least),
        # else the min wins and small images get more tokens than asked for
        lo = min(lo, hi) if min_pixels is None else min_pixels
        image_processor.size = {"shortest_edge": lo, "longest_edge": hi}
        return cls(tokenizer, image_processor, getattr(image_processor, "merge_size", 2), system_prompt,
                   model_family)

    @property
    def pixel_bounds(self):
        """(min_pixels, max_pixels) the images are resized between."""
        return self.image_processor.size["shortest_edge"], self.image_processor.size["longest_edge"]

    @property
    def token_pixels(self):
        """Pixels one visual token covers: (patch · merge)², 28² for Qwen2.5-VL and 32² for Qwen3-VL."""
        return (self.image_processor.patch_size * self.merge_size) ** 2

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


def text_generator(model, processor, max_new_tokens=16, batch_size=32):
    """A `generate_fn(list[str]) -> list[str]`: greedy text-only answers (the LLM verifier of reward.py)."""
    device = next(model.parameters()).device

    def generate(prompts):
        out = []
        for s in range(0, len(prompts), batch_size):
            batch = processor.encode(None, prompts[s:s + batch_size]).to(device)
            done = sample_completions(model, batch, max_new_tokens=max_new_tokens, greedy=True,
                                      **processor.sampling_tokens)
            out += processor.decode(done.completion_ids, done.completion_mask)
        return out
    return generate


# ----------------------------------------------------------------------------------------------------
# scoring: per-token log-probs of given completions

def _token_logprobs(hidden, weight, targets, temperature, want_entropy, entropy_grad=False):
    logits = F.linear(hidden, weight).float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    if not want_entropy:
        return logp, torch.zeros_like(logp)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    # detached unless a loss term needs it: its backward keeps one more chunk of probabilities
    return logp, entropy if entropy_grad else entropy.detach()


def completion_lengths(mask):
    """Per row, the columns up to its last masked-in token (0 for an empty row): the part of a
    right-padded completion a forward needs."""
    columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (columns * (mask > 0)).amax(1)


@dataclass
class SharedPrefixLayout:
    """Completions packed behind their prompts: one row per distinct prompt, holding the prompt (left-
    padded as in the PromptBatch) and then each of its completions one after another. `attend` lets a
    prompt token see the prompt causally, and a completion token see its prompt and, causally, its own
    completion, never another completion of the row. `gather` (rows, cols) picks, for each completion
    position t, the packed position whose hidden state predicts token t (the prompt's last token for
    t = 0, else the completion's own token t - 1)."""
    input_ids: torch.Tensor          # (R, S)
    position_ids: torch.Tensor       # (3, R, S)
    mm_token_type_ids: torch.Tensor  # (R, S)
    attend: torch.Tensor             # (R, 1, S, S) bool, True = may attend
    gather_rows: torch.Tensor        # (N, 1)
    gather_cols: torch.Tensor        # (N, L)
    prompts: PromptBatch             # the R distinct prompt rows (their pixels feed the vision tower)


def shared_prefix_layout(batch, prompt_rows, completion_ids, completion_mask):
    """Pack completion i behind prompt row `prompt_rows[i]` of `batch` (see SharedPrefixLayout).

    Positions continue each prompt's M-RoPE positions, restarting after the prompt for every completion,
    so completion i sees exactly the positions, keys and values it sees in a forward of its own."""
    distinct = list(dict.fromkeys(prompt_rows))          # prompt rows in order of first use
    slot = {row: r for r, row in enumerate(distinct)}
    prompts = batch.select(distinct)
    R, Tp = prompts.input_ids.shape
    N, L = completion_ids.shape
    device = completion_ids.device
    lengths = completion_lengths(completion_mask).tolist()
    starts, ends = [], [Tp] * R
    for i, row in enumerate(prompt_rows):
        r = slot[row]
        starts.append(ends[r])
        ends[r] += lengths[i]
    S = max(ends)
    input_ids = torch.zeros(R, S, dtype=torch.long, device=device)
    position_ids = torch.zeros(3, R, S, dtype=torch.long, device=device)
    key_ok = torch.zeros(R, S, dtype=torch.bool, device=device)
    segment = torch.full((R, S), -2, dtype=torch.long, device=device)  # -1 prompt, i completion i, -2 padding
    input_ids[:, :Tp], position_ids[:, :, :Tp] = prompts.input_ids, prompts.position_ids
    key_ok[:, :Tp], segment[:, :Tp] = prompts.attention_mask.bool(), -1
    first = prompts.next_positions()                      # (3, R)
    gather_cols = torch.full((N, L), Tp - 1, dtype=torch.long, device=device)
    for i, row in enumerate(prompt_rows):
        r, s, n = slot[row], starts[i], lengths[i]
        input_ids[r, s:s + n] = completion_ids[i, :n]
        position_ids[:, r, s:s + n] = first[:, r, None] + torch.arange(n, device=device)
        key_ok[r, s:s + n] = completion_mask[i, :n] > 0
        segment[r, s:s + n] = i
        gather_cols[i, 1:n] = torch.arange(s, s + n - 1, device=device)
    q, k = torch.arange(S, device=device)[:, None], torch.arange(S, device=device)[None, :]
    same = (segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None])  # (R, S_q, S_k)
    attend = (k <= q) & same & key_ok[:, None, :] & (segment != -2)[:, :, None]
    # a padding position attends to itself: no query row is fully masked (softmax over nothing is NaN,
    # and NaN values would leak through the zero weights of the rows that do read them)
    attend |= torch.eye(S, dtype=torch.bool, device=device) & ~attend.any(-1, keepdim=True)
    mm = torch.zeros(R, S, dtype=torch.long, device=device)
    mm[:, :Tp] = prompts.mm_token_type_ids
    rows = torch.tensor([slot[row] for row in prompt_rows], dtype=torch.long, device=device)[:, None]
    return SharedPrefixLayout(input_ids, position_ids, mm, attend[:, None], rows, gather_cols, prompts)


def _mask_for(model, attend, dtype):
    """The 4-D mask in the form the model's attention takes: boolean for sdpa, additive for eager."""
    kind = model.config._attn_implementation
    if kind == "sdpa":
        return attend
    if kind == "eager":
        return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill(~attend, torch.finfo(dtype).min)
    raise ValueError(f"the shared-prefix forward needs sdpa or eager attention, not {kind!r} "
                     f"(or score one row per completion: --prefix_forward per_row)")


def completion_hidden_states(model, batch, completion_ids, completion_mask, prompt_rows=None, shared_prefix=True):
    """(N, L, hidden): the last layer's state before each completion token (the one that predicts it).

    Per row (the reference): prompt ⊕ completion for each completion, the prompt repeated as often as it
    has completions. Shared prefix: each distinct prompt once, its completions packed behind it
    (`shared_prefix_layout`), so the vision tower and the prompt's layers run once per prompt row; each
    completion attends to its prompt's keys and values as it would in its own row, so the states, and
    the gradients that flow back into the prompt (summed over its completions), are the same."""
    N, L = completion_ids.shape
    given_rows = prompt_rows
    prompt_rows = list(range(N)) if prompt_rows is None else list(prompt_rows)
    if not shared_prefix or len(set(prompt_rows)) == N:  # per row (or nothing to share)
        rows = batch if given_rows is None else batch.select(prompt_rows)
        Tp = rows.input_ids.shape[1]
        cmask = completion_mask.to(rows.attention_mask.dtype)
        completion_pos = rows.next_positions()[..., None] + torch.arange(L, device=completion_ids.device)
        return model.model(
            input_ids=torch.cat([rows.input_ids, completion_ids], 1),
            attention_mask=torch.cat([rows.attention_mask, cmask], 1),
            position_ids=torch.cat([rows.position_ids, completion_pos], 2),
            # without mm_token_type_ids transformers silently falls back to 1-D positions inside the model
            mm_token_type_ids=torch.cat([rows.mm_token_type_ids, torch.zeros_like(completion_ids)], 1),
            pixel_values=rows.pixel_values, image_grid_thw=rows.image_grid_thw, use_cache=False,
        ).last_hidden_state[:, Tp - 1:Tp - 1 + L]  # the state before token t predicts token t
    pack = shared_prefix_layout(batch, prompt_rows, completion_ids, completion_mask)
    hidden = model.model(
        input_ids=pack.input_ids, attention_mask=_mask_for(model, pack.attend, model.lm_head.weight.dtype),
        position_ids=pack.position_ids, mm_token_type_ids=pack.mm_token_type_ids,
        pixel_values=pack.prompts.pixel_values, image_grid_thw=pack.prompts.image_grid_thw, use_cache=False,
    ).last_hidden_state
    return hidden[pack.gather_rows, pack.gather_cols]


def sequence_logprobs(model, batch, completion_ids, completion_mask, *, prompt_rows=None, temperature=1.0,
                      chunk_size=1024, return_entropy=False, shared_prefix=True, entropy_grad=False):
    """log softmax(logits / T)[o_t] of each completion token, from one forward over prompts and completions.

    Completion i continues prompt row `prompt_rows[i]` of `batch` (default: row i). With `shared_prefix`
    a prompt that several completions continue (a GRPO group) is encoded once for all of them; without,
    once per completion, the reference it is tested against (`completion_hidden_states`). The vocabulary
    projection runs over chunks of `chunk_size` positions, each under activation checkpointing when
    gradients are on, so only one chunk of (rows × chunk × vocab) fp32 logits exists at a time, in the
    forward and in the backward. Returns (N, L) log-probs [and entropies: with `entropy_grad`, with their
    gradient (an entropy bonus), else detached].
    """
    L = completion_ids.shape[1]
    hidden = completion_hidden_states(model, batch, completion_ids, completion_mask, prompt_rows, shared_prefix)
    weight = model.lm_head.weight
    logps, entropies = [], []
    for s in range(0, L, chunk_size):
        args = (hidden[:, s:s + chunk_size], weight, completion_ids[:, s:s + chunk_size], temperature,
                return_entropy, entropy_grad)
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


class Policy(nn.Module):
    """The model as training sees it, and the module that DDP / FSDP2 wrap.

    `policy(batch, completion_ids, completion_mask, prompt_rows=...)` = `sequence_logprobs`; any other call (the sampler's
    prefill and decode steps) goes to the Hugging Face model. Both pass through this module's forward,
    so data-parallel wrappers see every call (FSDP2 gathers its root parameters there)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    @property
    def config(self):
        return self.vlm.config

    def forward(self, batch=None, completion_ids=None, completion_mask=None, prompt_rows=None, temperature=1.0,
                return_entropy=False, shared_prefix=True, entropy_grad=False, **lm_kwargs):
        if batch is None:
            return self.vlm(**lm_kwargs)
        return sequence_logprobs(self.vlm, batch, completion_ids, completion_mask, prompt_rows=prompt_rows,
                                 temperature=temperature, return_entropy=return_entropy, shared_prefix=shared_prefix,
                                 entropy_grad=entropy_grad)


# ----------------------------------------------------------------------------------------------------
# training set-up, shared by sft.py and grpo.py

def configure_trainable(model, *, lora_r=0, lora_alpha=32, lora_dropout=0.05, train_vision=False,
                        gradient_checkpointing=False):
    """Choose what trains and keep it in fp32 (master weights; bf16 compute comes from autocast).

    LoRA (lora_r > 0): adapters on the language model (and on the vision tower with train_vision), all
    base weights frozen. Full fine-tuning: everything trains except the vision tower and its merger
    (the projector) unless train_vision. Returns the trainable parameters."""
    if lora_r > 0:
        lora.add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, include_vision=train_vision)
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
    """AdamW; weight decay on matrices only (not on biases and norms)."""
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


def clip_gradients(params, max_norm):
    """Clip to max_norm and return the total norm (a float; inf/nan when some gradient is not finite)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(norm)


@dataclass
class Training:
    """What sft.py and grpo.py train, as `setup_training` leaves it."""
    policy: Policy             # sampled from, scored, saved
    trainable: nn.Module       # what the loss calls: the policy wrapped by DDP / FSDP2, or the policy itself
    processor: Processor
    params: list               # the trainable parameters (FSDP2: their shards)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    bf16: bool
    reference: Policy | None = None  # full fine-tuning with a KL term: a frozen copy of the start
    start_step: int = 0
    resumed: dict = field(default_factory=dict)  # the `extra` saved with the checkpoint resumed from
    max_grad_norm: float = 1.0  # gradient clipping (0: none)

    def optimizer_step(self):
        """Clip, step (unless a gradient is not finite: then nothing reaches the weights), zero the
        gradients, advance the schedule (always, so a resumed run stays step-exact). Returns the norm."""
        grad_norm = clip_gradients(self.params, self.max_grad_norm)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            print(f"warning: non-finite gradient norm ({grad_norm}); update skipped", flush=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm


def add_training_args(ap, *, lr, schedule, warmup_ratio):
    """The flags `setup_training` reads (and the length of the run), with the stage's own schedule defaults."""
    a = ap.add_argument
    a("--max_steps", type=nonnegative_int, default=0, help="training steps (0: from --epochs)")
    a("--epochs", type=positive_float, default=1.0, help="passes over the data (ignored with --max_steps)")
    a("--lr", type=positive_float, default=lr, help="peak learning rate (AdamW)")
    a("--schedule", default=schedule, choices=["constant", "cosine"], help="after the warmup")
    a("--warmup_ratio", type=fraction, default=warmup_ratio, help="share of the updates with linear warmup")
    a("--weight_decay", type=nonnegative_float, default=0.0, help="AdamW weight decay on matrices")
    a("--grad_clip", type=nonnegative_float, default=1.0, help="max gradient norm (0: no clipping)")
    a("--lora_r", type=nonnegative_int, default=0, help="LoRA rank (0: full fine-tuning)")
    a("--lora_alpha", type=positive_float, default=32, help="LoRA scale alpha / r")
    a("--lora_dropout", type=fraction, default=0.05, help="dropout on the adapters' input")
    a("--train_vision", action="store_true", help="also train the vision tower and merger (frozen by default)")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    a("--fsdp", action="store_true", help="shard with FSDP2 under torchrun (full fine-tuning of 7B) instead of DDP")
    a("--save_every", type=nonnegative_int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep", type=nonnegative_int, default=2, help="step checkpoints kept on disk")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def setup_training(args, d, total_updates, reference=False):
    """load → choose what trains → wrap for data parallelism → optimizer and schedule → resume.

    With --resume the newest complete checkpoint in --out is continued: full fine-tuning takes its
    weights, LoRA puts its adapter back on the starting model; optimizer, schedule and RNG are restored.
    `reference`: also load the KL term's reference policy (the starting weights, frozen) for full
    fine-tuning; with LoRA the reference is the policy itself with its adapters switched off."""
    if d.is_main:
        for line in checkpoint.clean_partial(args.out):
            print(line, flush=True)
    barrier()
    resume_from = checkpoint.latest_checkpoint(args.out) if args.resume else None
    if resume_from:
        checkpoint.check_resume_args(resume_from, args)
    elif args.resume:
        print0(f"--resume: no checkpoint in {args.out} yet, starting from step 0")
    bf16 = resolve_dtype(args.dtype, d.device) == torch.bfloat16
    # FSDP2 shards fp32 weights loaded on the CPU; everything else loads on its device in its dtype
    where, dtype = ("cpu", "fp32") if args.fsdp else (d.device, args.dtype)
    model = load_model(resume_from if resume_from and not args.lora_r else args.model, where, dtype)
    processor = Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    configure_trainable(model, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        train_vision=args.train_vision, gradient_checkpointing=args.gradient_checkpointing)
    if resume_from and args.lora_r:
        lora.load_lora_weights(model, resume_from)
    trainable, policy = wrap_policy(model.to(d.device), d, fsdp=args.fsdp, bf16=bf16)
    ref = None
    if reference and not args.lora_r:  # sharded like the policy under FSDP2, a plain copy otherwise
        ref_model = load_model(args.model, where, dtype).requires_grad_(False)
        _, ref = wrap_policy(ref_model.to(d.device), d if args.fsdp else Dist(device=d.device),  # no DDP: no grads
                             fsdp=args.fsdp, bf16=bf16)
        ref.eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    scheduler = lr_schedule(optimizer, args.schedule, int(args.warmup_ratio * total_updates), total_updates)
    training = Training(policy, trainable, processor, params, optimizer, scheduler, bf16, ref,
                        max_grad_norm=args.grad_clip)
    if resume_from:
        training.start_step, training.resumed = checkpoint.load_training_state(resume_from, training, args.fsdp)
        print0(f"resumed from {resume_from} at step {training.start_step}")
    return training
