"""lora.py and checkpoint.py: adapters off = base, merged = unmerged, checkpoints that round-trip through
plain transformers, crash-safe saves, training state without pickle."""
import os

import pytest
import torch

import checkpoint
import lora
import trainer
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
    # with the vision tower: its MLPs too, whatever the family names them (gate/up/down_proj, linear_fc1/2)
    vision = lora.add_lora(fresh_model(tiny_dir), r=4, alpha=8, dropout=0.0, include_vision=True) - n
    assert vision >= 2 * model.config.vision_config.depth
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in k or ".lora_B" in k for k in trainable)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: B != 0
        for m in lora.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    batch = proc.encode(images, QUESTIONS)
    ids, mask = proc.encode_completions(["<answer>red square</answer>", "b", "c d e"])
    score = lambda m: trainer.sequence_logprobs(m, batch, ids, mask)
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
    _, proc = tiny
    model = fresh_model(tiny_dir)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0, include_vision=True)
    with torch.no_grad():
        for m in lora.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    batch = proc.encode(images, QUESTIONS)
    ids, mask = proc.encode_completions(["<answer>x</answer>", "y", "z"])
    with torch.no_grad():
        before = trainer.sequence_logprobs(model, batch, ids, mask)
    checkpoint.save_checkpoint(model, proc, str(tmp_path / "ckpt"))
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "adapter.safetensors", "adapter_config.json"} <= files
    loaded = vlm.model_class(model.config).from_pretrained(str(tmp_path / "ckpt")).eval()  # plain transformers
    with torch.no_grad():
        after = trainer.sequence_logprobs(loaded, batch, ids, mask)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # the adapter alone on a fresh base gives the same model
    again = lora.load_adapter(fresh_model(tiny_dir), str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(trainer.sequence_logprobs(again, batch, ids, mask), before, atol=1e-6, rtol=0)
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
    reloaded = vlm.model_class(model.config).from_pretrained(path)
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


def test_saved_config_carries_what_transformers_4_reads(tiny_dir, tiny, tmp_path, family):
    """transformers 4.5x builds the text config from text_config alone: rope_scaling (with mrope_section, in
    the family's form), rope_theta and tie_word_embeddings must be there, equal to what 5.x uses; the
    tokenizer class must be one 4.5x has; the image bounds also as the top-level keys 4.5x reads."""
    import json
    model, proc = fresh_model(tiny_dir), tiny[1]
    checkpoint.save_checkpoint(model, proc, str(tmp_path / "ckpt"))
    config = json.load(open(tmp_path / "ckpt" / "config.json"))
    text, rope = config["text_config"], config["text_config"]["rope_parameters"]
    assert text["rope_scaling"] == {
        "qwen2_5_vl": {"type": "mrope", "mrope_section": rope["mrope_section"]},
        "qwen3_vl": {"rope_type": "default", "mrope_section": rope["mrope_section"], "mrope_interleaved": True}}[family]
    assert text["rope_theta"] == rope["rope_theta"] and text["tie_word_embeddings"] is config["tie_word_embeddings"]
    tokenizer = json.load(open(tmp_path / "ckpt" / "tokenizer_config.json"))
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in tokenizer or isinstance(tokenizer["extra_special_tokens"], dict)
    pre = json.load(open(tmp_path / "ckpt" / "preprocessor_config.json"))
    assert (pre["min_pixels"], pre["max_pixels"]) == (pre["size"]["shortest_edge"], pre["size"]["longest_edge"])
    # and 5.x reads it all back the same
    from transformers import AutoConfig
    again = AutoConfig.from_pretrained(str(tmp_path / "ckpt"))
    assert again.text_config.rope_parameters == model.config.text_config.rope_parameters
    assert again.tie_word_embeddings == config["tie_word_embeddings"]
    assert vlm.Processor.from_pretrained(str(tmp_path / "ckpt")).pixel_bounds == proc.pixel_bounds


TRANSFORMERS4 = os.environ.get("FGRL_TRANSFORMERS4_PYTHON")
FORWARD_IN_TRANSFORMERS4 = r"""
import json, sys, torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2VLImageProcessor
folder, inputs, out, model_class = sys.argv[1:5]
model, info = getattr(transformers, model_class).from_pretrained(folder, output_loading_info=True,
                                                                 attn_implementation="sdpa")
t = load_file(inputs)
with torch.no_grad():
    logits = model.eval()(input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"],
                          pixel_values=t["pixel_values"], image_grid_thw=t["image_grid_thw"]).logits
save_file({"logits": logits.contiguous()}, out)
tok = AutoTokenizer.from_pretrained(folder)
ip = Qwen2VLImageProcessor.from_pretrained(folder)
print(json.dumps({"version": transformers.__version__, "missing": info["missing_keys"],
                  "ids": tok("<|im_start|>user\nHi<|im_end|>")["input_ids"], "pixels": [ip.min_pixels, ip.max_pixels]}))
"""


@pytest.mark.skipif(not TRANSFORMERS4, reason="needs FGRL_TRANSFORMERS4_PYTHON: a python with transformers 4.57 "
                                              "(bash runs/check_transformers4.sh builds one and runs this; CI does)")
@pytest.mark.parametrize("tie", [True, False])
def test_a_checkpoint_loads_with_identical_logits_in_transformers_4(tmp_path, images, tie, family):
    """A checkpoint saved here (LoRA merged in), loaded by transformers 4.57 in its own virtual environment,
    gives the logits transformers 5.x gives; tokenizer and image bounds read the same. Both families:
    4.57 has Qwen3-VL (Qwen3-VL-2B/4B tie their embeddings, 8B does not)."""
    import json
    import subprocess
    from safetensors.torch import load_file, save_file
    from tiny import build_tiny_model
    build_tiny_model(str(tmp_path / "start"), seed=1, init_std=0.1, tie=tie, family=family)
    model, proc = vlm.load_model(str(tmp_path / "start")), vlm.Processor.from_pretrained(str(tmp_path / "start"))
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    checkpoint.save_checkpoint(model, proc, str(tmp_path / "ckpt"))
    batch = proc.encode(images, QUESTIONS)
    inputs = {k: getattr(batch, k).contiguous() for k in ("input_ids", "attention_mask", "position_ids",
                                                          "pixel_values", "image_grid_thw")}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    saved = vlm.load_model(str(tmp_path / "ckpt"))
    with torch.no_grad():
        ours = saved(**inputs, mm_token_type_ids=batch.mm_token_type_ids).logits
    (tmp_path / "forward4.py").write_text(FORWARD_IN_TRANSFORMERS4)
    done = subprocess.run([TRANSFORMERS4, str(tmp_path / "forward4.py"), str(tmp_path / "ckpt"),
                           str(tmp_path / "inputs.safetensors"), str(tmp_path / "logits4.safetensors"),
                           vlm.FAMILIES[family].model_class],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["version"].startswith("4.") and report["missing"] == []
    assert report["ids"] == proc.tokenizer("<|im_start|>user\nHi<|im_end|>")["input_ids"]
    assert report["pixels"] == list(proc.pixel_bounds)
    theirs = load_file(str(tmp_path / "logits4.safetensors"))["logits"]
    assert ours.abs().max() > 1.0  # logits of a real size: the comparison is not vacuous
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_what_a_crash_mid_save_leaves_is_put_right(tmp_path):
    out = tmp_path / "run"
    for name in ("step_000002", "step_000004.partial-123", "final.old-77", "step_000002.old-5"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_text(name)
    done = checkpoint.clean_partial(str(out))
    assert sorted(os.listdir(out)) == ["final", "step_000002"]
    assert (out / "final" / "model.safetensors").read_text() == "final.old-77"  # the complete previous final
    assert (out / "step_000002" / "model.safetensors").read_text() == "step_000002"
    assert len(done) == 3 and any("half-written" in line for line in done)
    assert checkpoint.clean_partial(str(out)) == [] and checkpoint.clean_partial(str(tmp_path / "none")) == []


def test_a_checkpoint_older_than_some_flags_resumes_at_their_defaults(tmp_path):
    """A checkpoint saved before some flags existed lacks them in its saved args: the old code ran as their
    defaults do, so at their defaults it is the same run and resumes; one set otherwise is refused by name.
    `defaults` are the parser's (trainer.setup_training passes them); without them every absent flag is
    refused, as before."""
    import grpo
    required = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"),
                "--out", str(tmp_path)]
    defaults = vars(grpo.parse_args(required))
    args = grpo.parse_args(required + ["--lr", "3e-3"])
    saved = checkpoint.run_flags(args)
    newer = ("class_balanced", "top_k", "prefix_forward", "class_list")  # absent, as an older version wrote
    for flag in newer:
        del saved[flag]
    folder = tmp_path / "step_000002"
    folder.mkdir()
    checkpoint.save_train_state(str(folder), step=2, extra={"args": saved})
    checkpoint.check_resume_args(str(folder), args, defaults=defaults)  # the same run: no error
    with pytest.raises(SystemExit) as e:
        later = grpo.parse_args(required + ["--lr", "3e-3", "--top_k", "5"])
        checkpoint.check_resume_args(str(folder), later, defaults=defaults)
    assert "--top_k (not set: the checkpoint predates it, so its default 0) then, 5 now" in str(e.value)
    assert not any(f"--{flag}" in str(e.value) for flag in newer if flag != "top_k")
    other_lr = grpo.parse_args(required + ["--lr", "1e-3"])
    with pytest.raises(SystemExit, match=r"--lr 0.003 then, 0.001 now"):  # a flag it saved: as before
        checkpoint.check_resume_args(str(folder), other_lr, defaults=defaults)
    with pytest.raises(SystemExit) as e:
        checkpoint.check_resume_args(str(folder), args)
    assert all(f"--{flag} (not set) then" in str(e.value) for flag in newer)
