"""tiny.py — a Qwen2.5-VL of about a million parameters, built in code: the model of the tests and the toy world.

Same architecture as Qwen2.5-VL-3B/7B (M-RoPE in Qwen's proportions, grouped KV heads, a windowed vision
tower with a full-attention block, 2×2 patch merging, tied embeddings as the 3B), with small widths and
depths, random weights, and a byte-level BPE tokenizer trained on the world's own texts, with Qwen's
special tokens and chat template. Nothing is downloaded; the same seed and corpus give the same files.

    python tiny.py --out out/tiny                           # random weights, the default corpus
    python tiny.py --out out/tiny --corpus data/toy/sft.jsonl
    python tiny.py --out out/rw7b --shape 7b --text_layers 2   # 7B's widths, two layers (runs/smoke_real_width.sh)
"""

import argparse
import json
import math
import os

import torch

from checkpoint import atomic_dir, make_portable
from vlm import QWEN_CHAT_TEMPLATE, SPECIAL_TOKENS, image_processor_class, load_model

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


def prompt_phrases():
    """Phrases every prompt repeats verbatim (data/prompts.py): each becomes one (ordinary, decodable)
    token, so the tiny model spends its compute on the image and the answer rather than on boilerplate."""
    from data import prompts
    questions = [prompts.open_question(ds).replace(prompts.FORMAT, "").strip() for ds in prompts.DOMAINS]
    return ["You are a helpful assistant.", prompts.FORMAT, "<think>", "</think>", "<answer>", "</answer>",
            "Answer with the option's letter.", " Options:", "Classify the image.",
            prompts.open_world_question().split(prompts.FORMAT)[1].strip()] + questions


def train_tokenizer(corpus=None, vocab_size=1024, phrases=None):
    """A byte-level BPE tokenizer trained on `corpus`, with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus or TINY_CORPUS) + [QWEN_CHAT_TEMPLATE], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.add_tokens(list(prompt_phrases() if phrases is None else phrases))
    return tokenizer


def _token_ids(tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(text=dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                          pad_token_id=ids["<|endoftext|>"]),
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _save(out_dir, model, tokenizer, image_processor, hub_form=False):
    from transformers import GenerationConfig
    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(eos_token_id=[end, pad], pad_token_id=pad, bos_token_id=pad)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        make_portable(tmp)
        if hub_form:  # the image bounds as the Hub's Qwen2.5-VL files write them: top-level keys, no `size`
            path = os.path.join(tmp, "preprocessor_config.json")
            with open(path) as f:
                config = json.load(f)
            size = config.pop("size")
            config.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
    return out_dir


def build_tiny_model(out_dir, seed=0, corpus=None, vocab_size=1024, image_size=112, text_layers=4,
                     hidden=128, vision_depth=2, vision_hidden=64, init_std=0.02, phrases=None, patch_size=14,
                     tie=True):
    """Create a tiny Qwen2.5-VL (random weights) and its tokenizer, deterministically from `seed` and
    `corpus`, saved as a Hugging Face folder. Images are resized to at most image_size² pixels."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tokenizer = train_tokenizer(corpus, vocab_size, phrases)
    ids = _token_ids(tokenizer)
    heads = 4
    head_dim = hidden // heads
    # (t, h, w) rotary sections in Qwen2.5-VL's proportions ([16, 24, 24] at head_dim 128), sum head_dim / 2
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64 * math.ceil(len(tokenizer) / 64), hidden_size=hidden,
                         intermediate_size=hidden * 3, num_hidden_layers=text_layers, num_attention_heads=heads,
                         num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         initializer_range=init_std, **ids["text"]),
        vision_config=dict(initializer_range=init_std, depth=vision_depth, hidden_size=vision_hidden,
                           intermediate_size=vision_hidden * 2, num_heads=2, out_hidden_size=hidden,
                           patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[vision_depth - 1]),
        tie_word_embeddings=tie,  # tied as Qwen2.5-VL-3B, untied as 7B
        **{k: v for k, v in ids.items() if k != "text"})
    torch.manual_seed(seed)
    config.initializer_range = init_std
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = image_processor_class()(
        size={"shortest_edge": (2 * patch_size) ** 2, "longest_edge": image_size * image_size},
        patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    return _save(out_dir, model, tokenizer, image_processor)


# Qwen2.5-VL-3B/7B-Instruct's config.json values that set the compute (vocabulary, widths, heads, depths)
REAL_SHAPES = {
    "3b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2), tie=True),
    "7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4), tie=False),
}
REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112)


def real_shape_config(shape, token_ids, text_layers=None, vision_depth=None):
    """Qwen2.5-VL-3B's or -7B's config (widths, heads, vocabulary, rotary sections, windowed vision
    attention with a full-attention block every 8th), optionally with fewer layers, and the special-token
    ids `token_ids` (a config or `_token_ids`' dict) of the tokenizer in use."""
    from transformers import Qwen2_5_VLConfig
    if not isinstance(token_ids, dict):  # a Qwen2_5_VLConfig
        c = token_ids
        token_ids = dict(text=dict(bos_token_id=c.text_config.bos_token_id, eos_token_id=c.text_config.eos_token_id,
                                   pad_token_id=c.text_config.pad_token_id),
                         image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                         vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id)
    s = REAL_SHAPES[shape]
    text = dict(s["text"], max_position_embeddings=128000, rms_norm_eps=1e-6, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}, **token_ids["text"])
    if text_layers:
        text["num_hidden_layers"] = text_layers
    depth = vision_depth or REAL_VISION["depth"]
    vision = dict(REAL_VISION, depth=depth, out_hidden_size=text["hidden_size"],
                  fullatt_block_indexes=list(range(7, depth, 8)) or [depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=s["tie"],
                            **{k: v for k, v in token_ids.items() if k != "text"})


def build_real_width_model(out_dir, shape="7b", text_layers=1, vision_depth=2, seed=0, corpus=None,
                           dtype=torch.bfloat16):
    """A Qwen2.5-VL with the real widths of `shape` but `text_layers` / `vision_depth` layers, random
    weights in `dtype`, the tiny tokenizer, and a preprocessor config in the Hub's form (top-level
    min_pixels / max_pixels, 16k visual tokens at most): the shapes the real checkpoints have, for the
    bugs a million-parameter model hides, on a CPU."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    tokenizer = train_tokenizer(corpus)
    config = real_shape_config(shape, _token_ids(tokenizer), text_layers, vision_depth)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    image_processor = image_processor_class()(size={"shortest_edge": 3136, "longest_edge": 12845056},
                                              patch_size=14, temporal_patch_size=2, merge_size=2)
    return _save(out_dir, model, tokenizer, image_processor, hub_form=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    ap.add_argument("--seed", type=int, default=0, help="the weights and nothing else depend on it")
    ap.add_argument("--corpus", nargs="*", help="files to train the BPE on: JSONL records (question, target, "
                    "label, options) or plain text, one document per line")
    ap.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size (upper bound)")
    ap.add_argument("--image_size", type=int, default=112, help="largest image side: max_pixels = side²")
    ap.add_argument("--text_layers", type=int, default=4, help="decoder layers of the language model")
    ap.add_argument("--hidden", type=int, default=128, help="width of the language model (tiny shape)")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "3b", "7b"],
                    help="3b / 7b: Qwen2.5-VL-3B's / 7B's widths, vocabulary and vision tower, with --text_layers "
                         "and --vision_depth layers, in bf16 (build_real_width_model)")
    ap.add_argument("--vision_depth", type=int, default=2, help="blocks of the vision tower")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    corpus = read_corpus(args.corpus or []) or None
    if args.shape == "tiny":
        build_tiny_model(args.out, seed=args.seed, corpus=corpus, vocab_size=args.vocab_size,
                         image_size=args.image_size, text_layers=args.text_layers, hidden=args.hidden,
                         vision_depth=args.vision_depth)
    else:
        build_real_width_model(args.out, args.shape, args.text_layers, args.vision_depth, args.seed, corpus)
    model = load_model(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
