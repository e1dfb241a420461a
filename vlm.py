"""vlm.py — the model as every stage sees it: load a Qwen2.5-VL or Qwen3-VL checkpoint, turn (image, question)
pairs into prompts.

- `load_model` / `Processor.from_pretrained`: a checkpoint from the Hub or a local folder, the same path
  for the real models and the tiny ones of the tests, the family read from its config (`FAMILIES`: the
  few things that differ); no `trust_remote_code`, no torchvision (the image processor + `<|image_pad|>`
  expansion + tokenization is done here instead of by Qwen2_5_VLProcessor / Qwen3VLProcessor).
- `Processor.encode` -> `PromptBatch`: chat-template prompts, left-padded, with pixels and explicit 3-D
  M-RoPE positions (`mrope_positions`): transformers 5.x must never infer positions by itself (it crashes
  or ignores left padding when decoding by hand).
Sampling lives in engine.py; scoring completions and the training set-up in trainer.py; LoRA in lora.py;
checkpoints in checkpoint.py.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import resolve_dtype
from data.records import load_image

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
    patch_size: int          # a visual token covers (patch_size·2)² pixels: 28² (Qwen2.5-VL), 32² (Qwen3-VL)


FAMILIES = {  # keyed by config.model_type
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", QWEN25_CHAT_TEMPLATE,
                         patch_size=14),
    "qwen3_vl": Family("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", QWEN3_CHAT_TEMPLATE,
                       patch_size=16),
}


def family(config):
    """The Family of a model's config; another model type is refused by name."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"model_type {config.model_type!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[config.model_type]


def model_class(config):
    """transformers' ...ForConditionalGeneration class of a config's family."""
    import transformers
    return getattr(transformers, family(config).model_class)


def check_model_path(path):
    """`path` as a string; a folder that does not exist raises "model folder not found", where transformers
    would say "Repo id must be in the form ...". Anything that could be a Hub id ("owner/name") passes."""
    path = str(path)
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    return path


def check_vision_sizes(path, image_processor, config):
    """Refuse an image processor whose patching differs from the vision tower's (a Qwen2.5-VL
    preprocessor_config.json beside a Qwen3-VL model, or the reverse): the tower would fail on the first
    image with a tensor-size mismatch that names neither file."""
    vision = config.vision_config
    sizes = [(getattr(image_processor, a, None), getattr(vision, b, None)) for a, b in
             (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
              ("merge_size", "spatial_merge_size"))]
    if any(p is not None and m is not None and p != m for p, m in sizes):
        said = lambda i: f"patch size {sizes[0][i]}, temporal patch {sizes[1][i]}, merge size {sizes[2][i]}"
        raise ValueError(f"{os.path.join(path, 'preprocessor_config.json')}: {said(0)}; the model's "
                         f"config.json: {said(1)} ({config.model_type}): the image processor belongs to "
                         "another model; copy the model's own preprocessor_config.json")


def load_model(path, device="cpu", dtype="fp32", attn="sdpa"):
    """Qwen2.5-VL or Qwen3-VL (by the checkpoint's config) from a Hub id or a local folder, in eval mode."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    path = check_model_path(path)
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
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tok("<|endoftext|>")
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
        path = check_model_path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError):  # a folder of tokenizer and image-processor files alone: no model type
            config = None
        model_family = family(config) if config is not None else FAMILIES["qwen2_5_vl"]
        image_processor = image_processor_class().from_pretrained(path)
        if config is not None:
            check_vision_sizes(path, image_processor, config)
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
