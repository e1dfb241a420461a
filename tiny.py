"""tiny.py — a Qwen2.5-VL or Qwen3-VL of about a million parameters, built in code: the model of the tests and
the toy world; and the real widths, for bench.py and the real-width smoke.

Same architecture as the real models (Qwen2.5-VL-3B/7B: M-RoPE in contiguous sections, a windowed vision
tower with a full-attention block, patch 14; Qwen3-VL-2B/4B/8B: per-head q/k norm, interleaved M-RoPE,
DeepStack, a learned vision position embedding, patch 16; both: grouped KV heads, 2×2 patch merging), with
small widths and depths, random weights, and a byte-level BPE tokenizer trained on the world's own texts,
with Qwen's special tokens and the family's chat template. Nothing is downloaded; the same seed and corpus
give the same files.

    python tiny.py --out out/tiny                           # random weights, the default corpus
    python tiny.py --out out/tiny3 --family qwen3_vl        # the same size, Qwen3-VL's architecture
    python tiny.py --out out/tiny --corpus data/toy/sft.jsonl
    python tiny.py --out out/rw7b --shape 7b --text_layers 2   # 7B's widths, two layers (runs/smoke_real_width.sh)
    python tiny.py --out out/rw8b --shape qwen3-8b --text_layers 2   # Qwen3-VL-8B's widths
"""

import argparse
import json
import math
import os

import torch

from checkpoint import atomic_dir, make_portable
from vlm import FAMILIES, QWEN25_CHAT_TEMPLATE, SPECIAL_TOKENS, image_processor_class, load_model, model_class

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


def train_tokenizer(corpus=None, vocab_size=1024, phrases=None, chat_template=QWEN25_CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on `corpus`, with Qwen's special tokens and `chat_template`. The
    vocabulary does not depend on the template (both families' are trained on as Qwen2.5-VL's), as the
    real families share theirs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus or TINY_CORPUS) + [QWEN25_CHAT_TEMPLATE], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = chat_template
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


def _image_processor(family, min_pixels, max_pixels):
    """The family's image processor: patch 14 and CLIP's mean/std (Qwen2.5-VL), patch 16 and mean/std 0.5
    (Qwen3-VL), as their Hub preprocessor configs say."""
    patch = FAMILIES[family].patch_size
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if family == "qwen3_vl" else {}
    return image_processor_class()(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch,
                                   temporal_patch_size=2, merge_size=2, **norm)


def mrope_sections(head_dim, family):
    """(t, h, w) rotary sections in each family's proportions, summing to head_dim / 2: [16, 24, 24]
    (Qwen2.5-VL) and [24, 20, 20] (Qwen3-VL) at head_dim 128."""
    half = head_dim // 2
    if family == "qwen3_vl":
        t = 3 * half // 8
        return [t, (half - t) // 2, (half - t) // 2]
    return [half // 4, 3 * half // 8, 3 * half // 8]


def family_config(family, text, vision, token_ids, tie):
    """A config of `family` from the widths both families share (`text`, `vision`: dicts of config keys),
    adding what each needs: Qwen2.5-VL windowed vision attention with a full-attention block every 8th;
    Qwen3-VL an explicit head_dim, interleaved M-RoPE and DeepStack at the vision blocks the real model uses
    (the first blocks, when the tower is cut down)."""
    import transformers
    text, vision = dict(text, **token_ids["text"]), dict(vision)
    rope = text.pop("rope")
    depth = vision["depth"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if family == "qwen3_vl":
        text.update(head_dim=head_dim)  # a key of Qwen3-VL's config (4B: 128, not 2560 / 32 heads)
        rope.update(mrope_interleaved=True)
        deepstack = vision.pop("deepstack", [])
        vision.update(deepstack_visual_indexes=[i for i in deepstack if i < depth] or list(range(min(3, depth))))
    else:
        vision.update(window_size=112, fullatt_block_indexes=list(range(7, depth, 8)) or [depth - 1])
    text["rope_parameters"] = dict(rope, rope_type="default", mrope_section=mrope_sections(head_dim, family))
    cls = getattr(transformers, FAMILIES[family].config_class)
    return cls(text_config=text, vision_config=dict(vision, spatial_merge_size=2, temporal_patch_size=2,
                                                    patch_size=FAMILIES[family].patch_size),
               tie_word_embeddings=tie, **{k: v for k, v in token_ids.items() if k != "text"})


def build_tiny_model(out_dir, seed=0, corpus=None, vocab_size=1024, image_size=112, text_layers=4,
                     hidden=128, vision_depth=2, vision_hidden=64, init_std=0.02, phrases=None, tie=True,
                     family="qwen2_5_vl"):
    """Create a tiny Qwen2.5-VL or Qwen3-VL (`family`: a key of vlm.FAMILIES; random weights) and its
    tokenizer, deterministically from `seed` and `corpus`, saved as a Hugging Face folder. Images are
    resized to at most image_size² pixels."""
    tokenizer = train_tokenizer(corpus, vocab_size, phrases, FAMILIES[family].chat_template)
    text = dict(vocab_size=64 * math.ceil(len(tokenizer) / 64), hidden_size=hidden, intermediate_size=hidden * 3,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope={"rope_theta": 10000.0},
                initializer_range=init_std)
    # Qwen3-VL's learned position embedding: an 8×8 grid, interpolated to each image's patch grid
    vision = dict(initializer_range=init_std, depth=vision_depth, hidden_size=vision_hidden,
                  intermediate_size=vision_hidden * 2, num_heads=2, out_hidden_size=hidden,
                  **({"num_position_embeddings": 64} if family == "qwen3_vl" else {}))
    config = family_config(family, text, vision, _token_ids(tokenizer), tie)  # tied as the small models
    torch.manual_seed(seed)
    config.initializer_range = init_std
    model = model_class(config)(config)
    patch = FAMILIES[family].patch_size
    return _save(out_dir, model, tokenizer, _image_processor(family, (2 * patch) ** 2, image_size * image_size))


# The real models' config.json values that set the compute (vocabulary, widths, heads, depths, rotary theta)
REAL_SHAPES = {
    "3b": dict(family="qwen2_5_vl", tie=True, text=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=128000), vision="qwen2.5"),
    "7b": dict(family="qwen2_5_vl", tie=False, text=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000), vision="qwen2.5"),
    "qwen3-2b": dict(family="qwen3_vl", tie=True, text=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144), vision="qwen3-small"),
    "qwen3-4b": dict(family="qwen3_vl", tie=True, text=dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144), vision="qwen3-small"),
    "qwen3-8b": dict(family="qwen3_vl", tie=False, text=dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144), vision="qwen3-8b"),
}
REAL_VISION = {  # the vision towers: one for Qwen2.5-VL 3B/7B, two sizes for Qwen3-VL
    "qwen2.5": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16),
    "qwen3-small": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304,
                        deepstack=[5, 11, 17]),
    "qwen3-8b": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                     deepstack=[8, 16, 24]),
}
ROPE_THETA = {"qwen2_5_vl": 1000000.0, "qwen3_vl": 5000000.0}
# the Hub preprocessor configs' bounds: 4 to 16,384 visual tokens of 28² (Qwen2.5-VL) / 64 to 16,384 of 32² px
HUB_PIXELS = {"qwen2_5_vl": (3136, 12845056), "qwen3_vl": (65536, 16777216)}


def _token_ids_of(config):
    """`_token_ids`' dict, read from a config of either family."""
    text = config.text_config
    return dict(text=dict(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                          pad_token_id=text.pad_token_id),
                image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id)


def real_shape_config(shape, token_ids, text_layers=None, vision_depth=None):
    """The config of a real model (`shape`, a key of REAL_SHAPES: widths, heads, vocabulary, rotary sections
    and theta, the vision tower), optionally with fewer layers, and the special-token ids `token_ids` (a
    config or `_token_ids`' dict) of the tokenizer in use."""
    if not isinstance(token_ids, dict):
        token_ids = _token_ids_of(token_ids)
    s = REAL_SHAPES[shape]
    text = dict(s["text"], rms_norm_eps=1e-6, rope={"rope_theta": ROPE_THETA[s["family"]]})
    if text_layers:
        text["num_hidden_layers"] = text_layers
    vision = dict(REAL_VISION[s["vision"]], out_hidden_size=text["hidden_size"])
    if vision_depth:
        vision["depth"] = vision_depth
    return family_config(s["family"], text, vision, token_ids, s["tie"])


def build_real_width_model(out_dir, shape="7b", text_layers=1, vision_depth=2, seed=0, corpus=None,
                           dtype=torch.bfloat16):
    """A model with the real widths of `shape` but `text_layers` / `vision_depth` layers, random weights in
    `dtype`, the tiny tokenizer, and a preprocessor config with the Hub's bounds (16k visual tokens at most;
    for Qwen2.5-VL in the Hub's form: top-level min_pixels / max_pixels): the shapes the real checkpoints
    have, for the bugs a million-parameter model hides, on a CPU."""
    family = REAL_SHAPES[shape]["family"]
    tokenizer = train_tokenizer(corpus, chat_template=FAMILIES[family].chat_template)
    config = real_shape_config(shape, _token_ids(tokenizer), text_layers, vision_depth)
    torch.manual_seed(seed)
    model = model_class(config)._from_config(config, dtype=dtype)
    return _save(out_dir, model, tokenizer, _image_processor(family, *HUB_PIXELS[family]),
                 hub_form=family == "qwen2_5_vl")


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
    ap.add_argument("--shape", default="tiny", choices=["tiny"] + list(REAL_SHAPES),
                    help="3b / 7b: Qwen2.5-VL-3B's / 7B's widths, vocabulary and vision tower (qwen3-2b / -4b / -8b: "
                         "Qwen3-VL's), with --text_layers and --vision_depth layers, in bf16 (build_real_width_model)")
    ap.add_argument("--family", default="qwen2_5_vl", choices=list(FAMILIES),
                    help="the tiny model's architecture (a real --shape has its own)")
    ap.add_argument("--vision_depth", type=int, default=2, help="blocks of the vision tower")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    corpus = read_corpus(args.corpus or []) or None
    if args.shape == "tiny":
        build_tiny_model(args.out, seed=args.seed, corpus=corpus, vocab_size=args.vocab_size,
                         image_size=args.image_size, text_layers=args.text_layers, hidden=args.hidden,
                         vision_depth=args.vision_depth, family=args.family)
    else:
        build_real_width_model(args.out, args.shape, args.text_layers, args.vision_depth, args.seed, corpus)
    model = load_model(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
