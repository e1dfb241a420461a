"""lora.py and checkpoint.py: adapters off = base, merged = unmerged, checkpoints that round-trip through
plain transformers, crash-safe saves, training state without pickle."""
import os

import pytest
import torch

import checkpoint
import lora
import vlm
from conftest import QUESTIONS

def fresh_model(tiny_dir):
    return vlm.load_model(tiny_dir)


def test_lora_off_equals_base_and_merge_equals_unmerged(tiny_dir, tiny, images):
    _, proc = tiny
    base = fresh_model(tiny_dir)
    model = fresh_model(tiny_dir)
    n = lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    assert n == 7 * model.config.text_config.num_hidden_layers  # LM linear layers only
    assert not any(".visual." in f".{k}" for k, _ in model.named_parameters() if "lora_" in k)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in k or ".lora_B" in k for k in trainable)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: B != 0
        for m in lora.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    batch = proc.encode(images, QUESTIONS)
    ids, mask = proc.encode_completions(["<answer>red square</answer>", "b", "c d e"])
    score = lambda m: vlm.sequence_logprobs(m, batch, ids, mask)
    with torch.no_grad():
        ref, lora_on = score(base), score(model)
        with lora.lora_disabled(model):
            lora_off = score(model)
        assert torch.equal(lora_off, ref)
        assert (lora_on - ref).abs().max() > 1e-3
        lora.merge_lora(model)
        assert not lora.lora_modules(model)
        torch.testing.assert_close(score(model), lora_on, atol=1e-5, rtol=0)


def test_save_load_round_trip_with_lora_merged(tiny_dir, tiny, images, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, proc = tiny
    model = fresh_model(tiny_dir)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    batch = proc.encode(images, QUESTIONS)
    ids, mask = proc.encode_completions(["<answer>x</answer>", "y", "z"])
    with torch.no_grad():
        before = vlm.sequence_logprobs(model, batch, ids, mask)
    checkpoint.save_checkpoint(model, proc, str(tmp_path / "ckpt"))
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "adapter.safetensors", "adapter_config.json"} <= files
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        after = vlm.sequence_logprobs(loaded, batch, ids, mask)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # the adapter alone on a fresh base gives the same model
    again = lora.load_adapter(fresh_model(tiny_dir), str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(vlm.sequence_logprobs(again, batch, ids, mask), before, atol=1e-6, rtol=0)
    proc2 = vlm.Processor.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(proc2.encode(images, QUESTIONS).input_ids, batch.input_ids)


def test_interrupted_save_leaves_previous_checkpoint(tiny_dir, tiny, tmp_path, monkeypatch):
    _, proc = tiny
    model = fresh_model(tiny_dir)
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(model, proc, path)
    before = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}

    def crash(tmp):
        raise KeyboardInterrupt("killed mid-save")

    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(model, proc, path, write_files=crash)  # weights written, then the crash
    assert {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)} == before
    from transformers import Qwen2_5_VLForConditionalGeneration
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert torch.equal(reloaded.lm_head.weight, fresh_model(tiny_dir).lm_head.weight)


def test_train_state_round_trip_without_pickle(tiny_dir, tmp_path):
    model = fresh_model(tiny_dir)
    lora.add_lora(model, r=2, alpha=4, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.manual_seed(11)
    checkpoint.save_train_state(str(tmp_path), step=7, optimizer=opt, extra={"data_pos": 3})
    expected_rand = torch.rand(3)
    meta, osd, tensors = checkpoint.load_train_state(str(tmp_path))
    opt2 = torch.optim.AdamW(params, lr=1e-3)
    opt2.load_state_dict(osd)
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(opt2.state_dict()["state"][k][name], v)
    checkpoint.restore_rng(meta, tensors)
    assert meta["step"] == 7 and meta["extra"] == {"data_pos": 3}
    assert torch.equal(torch.rand(3), expected_rand)
    assert not any(f.endswith((".pt", ".bin", ".pkl")) for f in os.listdir(tmp_path))
