"""vlm.py against slow, obviously-correct references: prompts, positions, the scorer (CPU, fp32, tiny model)."""
import os

import pytest
import torch

import engine
import tiny
import trainer
import vlm
from conftest import QUESTIONS, random_image

def test_encode_left_pads_and_expands_image_tokens(tiny, images, family):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # different text and image lengths
    assert (batch.attention_mask[:, -1] == 1).all()  # left padding: every row ends with a real token
    n_image = (batch.input_ids == proc.image_token_id).sum(1).tolist()
    # both families: a 56 px side is 2 tokens of 28 px, or of 32 px once rounded to 64
    assert n_image == [4, 6, 8] == (batch.image_grid_thw.prod(-1) // 4).tolist()
    text = proc.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    # Qwen3-VL's template adds no default system turn
    first_turn = {"qwen2_5_vl": "<|im_start|>system\n", "qwen3_vl": "<|im_start|>user\n"}[family]
    assert text.startswith(first_turn) and text.endswith("Hi<|im_end|>\n<|im_start|>assistant\n")


def test_positions_equal_transformers_rope_index(tiny, images):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    ref, _ = model.model.get_rope_index(batch.input_ids, batch.mm_token_type_ids, batch.image_grid_thw,
                                         attention_mask=batch.attention_mask)
    assert torch.equal(batch.position_ids, ref)
    assert (batch.position_ids[:, :, -1] + 1 < batch.attention_mask.sum(1)).all()  # images shorten positions


def test_scorer_equals_sampler_logprobs(tiny, images, family):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    roll = engine.sample_completions(model, batch, group_size=2, max_new_tokens=16, temperature=0.7, top_p=0.9,
                                  generator=torch.Generator().manual_seed(0), eos_token_ids=proc.eos_token_ids,
                                  pad_token_id=proc.pad_token_id)
    rows = batch.repeat_interleave(2)
    with torch.no_grad():
        logp = trainer.sequence_logprobs(model, rows, roll.completion_ids, roll.completion_mask, temperature=0.7)
    torch.testing.assert_close(logp, roll.logprobs, atol=1e-4, rtol=0)

    # The silent fallback this guards against: a forward that leaves positions to transformers and passes
    # no mm_token_type_ids gets 1-D positions, and its log-probs differ — so the assertion above would fail.
    # (Qwen3-VL's forward refuses such a call instead.)
    fallback_forward = lambda: model(input_ids=torch.cat([rows.input_ids, roll.completion_ids], 1),
                                     attention_mask=torch.cat([rows.attention_mask, roll.completion_mask.long()], 1),
                                     pixel_values=rows.pixel_values, image_grid_thw=rows.image_grid_thw)
    if family == "qwen3_vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            fallback_forward()
        return
    with torch.no_grad():
        out = fallback_forward()
    T = rows.input_ids.shape[1]
    L = roll.completion_ids.shape[1]
    fallback = (out.logits[:, T - 1:T - 1 + L].float() / 0.7).log_softmax(-1)
    fallback = fallback.gather(-1, roll.completion_ids[..., None])[..., 0] * roll.completion_mask
    assert (fallback - roll.logprobs).abs().max() > 1e-3


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_scorer_equals_full_logits_with_gradients(tiny, images, entropy_grad):
    """Log-probs and entropies; with `entropy_grad` the loss has an entropy bonus, whose gradient reaches
    the layers below the projection too (the final norm's weight)."""
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    ids, mask = proc.encode_completions(["<answer>red</answer>", "a", "<think>x</think> and more text"])
    weight, norm = model.lm_head.weight, model.model.language_model.norm.weight

    def loss_of(fn):
        model.zero_grad()
        logp, entropy = fn()
        loss = (logp * torch.linspace(1, 2, logp.shape[1])).sum()
        if entropy_grad:
            loss = loss - (entropy * torch.linspace(3, 1, logp.shape[1])).sum()
        loss.backward()
        return logp.detach(), weight.grad.clone(), entropy.detach(), norm.grad.clone()

    chunked = loss_of(lambda: trainer.sequence_logprobs(model, batch, ids, mask, temperature=0.9, chunk_size=3,
                                                    return_entropy=True, entropy_grad=entropy_grad))

    def full():  # reference: the whole logits tensor at once
        T = batch.input_ids.shape[1]
        pos = batch.next_positions()[..., None] + torch.arange(ids.shape[1])
        out = model(input_ids=torch.cat([batch.input_ids, ids], 1),
                    attention_mask=torch.cat([batch.attention_mask, mask.long()], 1),
                    position_ids=torch.cat([batch.position_ids, pos], 2),
                    mm_token_type_ids=torch.cat([batch.mm_token_type_ids, torch.zeros_like(ids)], 1),
                    pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
        lp = (out.logits[:, T - 1:T - 1 + ids.shape[1]].float() / 0.9).log_softmax(-1)
        entropy = -(lp.exp() * lp).sum(-1) * mask
        return lp.gather(-1, ids[..., None])[..., 0] * mask, entropy if entropy_grad else entropy.detach()

    reference = loss_of(full)
    torch.testing.assert_close(chunked[0], reference[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[1], reference[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked[2], reference[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[3], reference[3], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(chunked[1]).all()
    model.zero_grad()


def test_missing_or_corrupt_image_names_the_file(tiny, tmp_path):
    _, proc = tiny
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match="nope.jpg"):
        proc.encode([str(missing)], ["q"])
    corrupt = tmp_path / "corrupt.jpg"
    random_image(56, 56, 0).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(ValueError, match="corrupt.jpg"):
        proc.encode([str(corrupt)], ["q"])


def test_text_only_prompts(tiny):
    model, proc = tiny
    batch = proc.encode(None, ["a question", "another, longer question about shapes"])
    assert batch.pixel_values is None
    roll = engine.sample_completions(model, batch, max_new_tokens=5, greedy=True, eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id)
    ref = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                         max_new_tokens=5, pad_token_id=proc.pad_token_id)[:, batch.input_ids.shape[1]:]
    assert torch.equal(roll.completion_ids, ref)


def test_build_tiny_model_is_deterministic(tmp_path, family):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tiny.build_tiny_model(a, seed=3, corpus=["red triangle", "blue square"], family=family)
    tiny.build_tiny_model(b, seed=3, corpus=["red triangle", "blue square"], family=family)
    for f in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f


@pytest.mark.parametrize("shape,billions", [("3b", 3.75), ("7b", 8.29), ("qwen3-2b", 2.13), ("qwen3-4b", 4.44),
                                            ("qwen3-8b", 8.77)])
def test_real_shapes_have_the_published_parameter_counts(shape, billions):
    """tiny.REAL_SHAPES against the sizes the Hub states for each model (built on the meta device: no memory);
    a wrong width, head_dim (Qwen3-VL-4B's is 128, not 2560 / 32 heads) or tie flag shows here."""
    ids = dict(text=dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643), image_token_id=151655,
               video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    config = tiny.real_shape_config(shape, ids)
    with torch.device("meta"):
        model = vlm.model_class(config)._from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions  # a tied head counted once


def test_missing_model_folder_names_the_folder(tmp_path):
    missing = str(tmp_path / "run" / "final")
    with pytest.raises(FileNotFoundError, match="model folder not found: .*run/final"):
        vlm.load_model(missing)


def visual_tokens(proc, h, w):
    return int(proc.encode([random_image(h, w, 0)], ["q"]).mm_token_type_ids.sum())


def test_a_checkpoint_is_evaluated_at_the_image_size_it_was_trained_at(squares, tmp_path):
    """--max_pixels defaults to what the checkpoint saved: train at one size, and every later stage
    (which loads the processor the same way, with no flag) runs at that size; a flag still wins."""
    import sft
    _, data, model_dir = squares
    start = vlm.Processor.from_pretrained(model_dir)
    assert start.pixel_bounds[1] == 112 * 112
    four_tokens = 4 * start.token_pixels  # 56² px for Qwen2.5-VL, 64² for Qwen3-VL
    sft.main(["--model", model_dir, "--data", data, "--out", str(tmp_path / "o"), "--batch_size", "4",
              "--micro_batch_size", "4", "--max_steps", "1", "--device", "cpu", "--max_pixels", str(four_tokens)])
    trained = str(tmp_path / "o" / "final")
    assert vlm.Processor.from_pretrained(trained).pixel_bounds[1] == four_tokens
    assert visual_tokens(vlm.Processor.from_pretrained(trained), 112, 112) == 4
    side = int(start.token_pixels ** 0.5)  # 112 px: 4 tokens a side of 28 px, 3 of 32 (rounded down to fit)
    assert visual_tokens(start, 112, 112) == (112 // side) ** 2
    assert visual_tokens(vlm.Processor.from_pretrained(trained, max_pixels=112 * 112), 112, 112) == (112 // side) ** 2


HUB_PIXELS = tiny.HUB_PIXELS  # the Hub preprocessor configs' bounds


def hub_form_folder(tiny_dir, folder, family):
    """A copy of the tiny model in the form of the Hub's files. Qwen2.5-VL: a flat config.json (no
    text_config; rope_scaling {"type": "mrope", ...} and rope_theta at the top, as transformers 4.41 wrote
    Qwen/Qwen2.5-VL-7B-Instruct's) and a preprocessor_config.json with top-level min_pixels / max_pixels
    and no `size`. Qwen3-VL (written by 4.57): text_config with rope_scaling {"rope_type": "default",
    "mrope_section", "mrope_interleaved": true} and rope_theta instead of rope_parameters, the vision
    config's model_type "qwen3_vl"; the bounds in `size`."""
    import json
    import shutil
    shutil.copytree(tiny_dir, folder)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config["vision_config"].pop("rope_parameters", None)
    config.update(torch_dtype="float32")
    if family == "qwen3_vl":
        text.update(rope_scaling={"rope_type": "default", "mrope_section": rope["mrope_section"],
                                  "mrope_interleaved": True}, rope_theta=rope["rope_theta"])
        config["vision_config"]["model_type"] = "qwen3_vl"
        config.update(text_config=text, transformers_version="4.57.0.dev0")
    else:
        for key in ("rope_scaling", "model_type", "layer_types", "dtype"):
            text.pop(key, None)
        config.update(text, rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
                      rope_theta=rope["rope_theta"], transformers_version="4.41.2")
    json.dump(config, open(path, "w"), indent=2)
    path = os.path.join(folder, "preprocessor_config.json")
    config = json.load(open(path))
    config.pop("size")
    for key in ("min_pixels", "max_pixels"):
        config.pop(key, None)
    lo, hi = HUB_PIXELS[family]
    if family == "qwen3_vl":
        config.update(size={"longest_edge": hi, "shortest_edge": lo}, image_processor_type="Qwen2VLImageProcessorFast",
                      processor_class="Qwen3VLProcessor")
    else:
        config.update(min_pixels=lo, max_pixels=hi, image_processor_type="Qwen2VLImageProcessor",
                      processor_class="Qwen2_5_VLProcessor")
    json.dump(config, open(path, "w"), indent=2)
    return folder


def test_a_checkpoint_in_the_hubs_form_loads_the_same_model(tiny_dir, tiny, images, tmp_path, family):
    """The real checkpoints' files are in an older form: loaded through the same path, the same model
    (rotary sections and theta, tied head) and the same prompts."""
    import json
    folder = hub_form_folder(tiny_dir, str(tmp_path / "hub"), family)
    assert "rope_parameters" not in json.dumps(json.load(open(os.path.join(folder, "config.json"))))
    model, proc = tiny
    hub = vlm.load_model(folder)
    hub_proc = vlm.Processor.from_pretrained(folder, min_pixels=proc.pixel_bounds[0], max_pixels=112 * 112)
    assert hub.config.text_config.rope_parameters == model.config.text_config.rope_parameters
    batch = proc.encode(images, QUESTIONS)
    assert torch.equal(hub_proc.encode(images, QUESTIONS).input_ids, batch.input_ids)
    ids, mask = proc.encode_completions(["<answer>red square</answer>", "b", "c d e"])
    with torch.no_grad():
        torch.testing.assert_close(trainer.sequence_logprobs(hub, batch, ids, mask),
                                   trainer.sequence_logprobs(model, batch, ids, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("h,w", [(333, 500), (1000, 750), (448, 448), (56, 56)])
def test_max_pixels_is_honoured_on_a_checkpoint_in_the_hubs_form(tiny_dir, tmp_path, h, w, family):
    """transformers lets a config's top-level min/max_pixels override a `size` passed to from_pretrained;
    the flag must win anyway, and with no flag the file's own bounds apply. Budgets in visual tokens: the
    same number of pixels is fewer tokens for Qwen3-VL (32² px a token) than for Qwen2.5-VL (28²)."""
    folder = hub_form_folder(tiny_dir, str(tmp_path / "hub"), family)
    own = vlm.Processor.from_pretrained(folder)
    assert own.pixel_bounds == HUB_PIXELS[family]
    px = own.token_pixels
    n_own = visual_tokens(own, h, w)
    area = max(h * w, own.pixel_bounds[0])  # the image's own area, or the smallest allowed
    assert abs(n_own * px - area) <= 0.5 * area  # nothing capped
    for max_pixels in (4 * px, 256 * px, 512 * px):
        proc = vlm.Processor.from_pretrained(folder, max_pixels=max_pixels)
        n = visual_tokens(proc, h, w)
        assert n * px <= max_pixels and n == min(n_own, n) and n >= 1
        if area > max_pixels:
            assert n * px >= max_pixels / 3  # capped, not collapsed
    assert visual_tokens(vlm.Processor.from_pretrained(folder, max_pixels=4 * px), h, w) <= 4


# Qwen2.5-VL's chat template as the Hub's checkpoints ship it (chat_template.json / tokenizer_config.json):
# a real checkpoint's tokenizer carries it, and vlm.Processor then uses it instead of QWEN25_CHAT_TEMPLATE
HUB_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# Qwen3-VL's chat template as the Hub's checkpoints ship it, its tool-calling branches left out (a system
# turn is written only when the messages have one)
HUB_QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == \"user\" %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content_item in message.content %}"
    "{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
HUB_CHAT_TEMPLATES = {"qwen2_5_vl": HUB_CHAT_TEMPLATE, "qwen3_vl": HUB_QWEN3_CHAT_TEMPLATE}


@pytest.mark.parametrize("system_prompt", [None, "You judge answers."])
@pytest.mark.parametrize("with_image", [True, False])
def test_prompts_are_what_the_hubs_own_template_gives(tiny, system_prompt, with_image, family):
    """The template used when a checkpoint has none renders every prompt this codebase sends exactly as
    the template the real checkpoints of its family carry: the tiny model is asked as the real one is."""
    _, proc = tiny
    ours = vlm.Processor(proc.tokenizer, proc.image_processor, system_prompt=system_prompt,
                         model_family=vlm.FAMILIES[family])
    ours.chat_template = vlm.FAMILIES[family].chat_template
    hub = vlm.Processor(proc.tokenizer, proc.image_processor, system_prompt=system_prompt)
    hub.chat_template = HUB_CHAT_TEMPLATES[family]
    for question in QUESTIONS + ["Options:\nA. x\nB. y\nAnswer with the option's letter."]:
        text = ours.prompt_text(question, with_image)
        assert text == hub.prompt_text(question, with_image)
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and ("<|image_pad|>" in text) == with_image
        assert text.startswith("<|im_start|>system\n") == (family == "qwen2_5_vl" or system_prompt is not None)


def test_a_large_jpeg_is_decoded_smaller_and_a_normal_one_exactly(tiny_dir, tmp_path):
    """load_image(path, max_pixels) decodes a JPEG many times over the bound at a reduced DCT scale (PIL's
    draft), never below the bound, so the processor still only shrinks it to the same patch grid; an image
    the bound does not halve is decoded exactly as before, pixel for pixel, so the model sees the same."""
    import numpy as np
    from PIL import Image
    from data.records import load_image
    processor = vlm.Processor.from_pretrained(tiny_dir)  # at most 112² pixels
    bound = processor.pixel_bounds[1]
    for size in ((120, 90), (200, 150)):  # under, and 2.7x over the bound (not 4x: no halving)
        random_image(size[1], size[0], seed=size[0]).save(tmp_path / "normal.jpg", quality=90)
        plain, bounded = load_image(tmp_path / "normal.jpg"), load_image(tmp_path / "normal.jpg", max_pixels=bound)
        assert bounded.size == plain.size and bounded.tobytes() == plain.tobytes()
        a, b = (processor.encode([im], ["Hi"]) for im in (plain, bounded))
        assert torch.equal(a.pixel_values, b.pixel_values)
    gradient = np.linspace(0, 255, 1600, dtype=np.uint8)[None, :, None].repeat(1200, 0).repeat(3, 2)
    Image.fromarray(gradient).save(tmp_path / "large.jpg", quality=90)
    plain, small = load_image(tmp_path / "large.jpg"), load_image(tmp_path / "large.jpg", max_pixels=bound)
    assert small.size == (200, 150) and small.size[0] * small.size[1] >= bound  # decoded at 1/8
    a, b = (processor.encode([im], ["Hi"]) for im in (plain, small))
    assert torch.equal(a.image_grid_thw, b.image_grid_thw)  # the same number of visual tokens
    assert (a.pixel_values - b.pixel_values).abs().mean() < 0.05  # the same picture, resampled from fewer pixels


def test_an_image_of_thousands_of_visual_tokens_is_warned_of_naming_the_flag(tiny_dir, tmp_path, capsys, family):
    """A Hub checkpoint allows 16,384 visual tokens per image: said up front with the count and the flag to
    set, rather than found out from an out-of-memory error. Image headers only: nothing is decoded."""
    from PIL import Image
    import common
    Image.new("RGB", (2800, 2100), (200, 30, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (56, 56)).save(tmp_path / "small.png")
    records = [{"image": str(tmp_path / "small.png")}, {"image": str(tmp_path / "big.png")}]
    hub_bounds = vlm.Processor.from_pretrained(tiny_dir, max_pixels=HUB_PIXELS[family][1])
    common.warn_large_images(records, hub_bounds)
    out = capsys.readouterr().out.strip().splitlines()
    n = {"qwen2_5_vl": 7500, "qwen3_vl": 5808}[family]  # 100 x 75 tokens of 28 px; 88 x 66 of 32 (2816x2112 px)
    assert len(out) == 1 and "big.png" in out[0] and f"{n} visual tokens" in out[0] and "--max_pixels" in out[0]
    assert f"e.g. {512 * hub_bounds.token_pixels}," in out[0]  # the example in the family's own unit
    common.warn_large_images(records, vlm.Processor.from_pretrained(tiny_dir, max_pixels=512 * hub_bounds.token_pixels))
    common.warn_large_images(records[:1], hub_bounds)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("load", [vlm.load_model, vlm.Processor.from_pretrained], ids=["model", "processor"])
def test_a_missing_model_folder_is_named_by_both_loaders(tmp_path, load):
    """evaluate.py and mine_topk.py load the processor first: `--model no/such/folder` failed inside
    AutoTokenizer ("Repo id must be in the form ...") before load_model's check was reached."""
    for missing in ("no/such/folder", str(tmp_path / "run" / "final"), "./final"):
        with pytest.raises(FileNotFoundError, match=f"model folder not found: {missing}$"):
            load(missing)


def test_a_preprocessor_config_of_the_other_family_is_refused_up_front(tiny_dir, tmp_path, family):
    """A Qwen3-VL checkpoint with Qwen2.5-VL's preprocessor_config.json (patch 14, not 16), or the reverse,
    failed inside the vision tower with a tensor-size mismatch: the processor names the file and both
    patch sizes before any image is encoded."""
    import shutil
    folder = str(tmp_path / "mixed")
    shutil.copytree(tiny_dir, folder)
    other = {"qwen2_5_vl": "qwen3_vl", "qwen3_vl": "qwen2_5_vl"}[family]
    tiny._image_processor(other, 64 * 64, 112 * 112).save_pretrained(folder)  # the other family's file
    mine, theirs = vlm.FAMILIES[family].patch_size, vlm.FAMILIES[other].patch_size
    with pytest.raises(ValueError, match=rf"{folder}/preprocessor_config.json: patch size {theirs}, "
                                         rf"temporal patch 2, merge size 2; the model's config.json: "
                                         rf"patch size {mine}, "):
        vlm.Processor.from_pretrained(folder)
