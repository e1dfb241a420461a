"""The shared model module against slow, obviously-correct references (CPU, fp32, tiny model)."""
import os

import pytest
import torch
import torch.nn.functional as F

import vlm
from conftest import random_image

QUESTIONS = ["Hi", "What is the name of the shape in this image?", "Name the shape, then explain why in detail."]


def generate_reference(model, batch, max_new_tokens, eos, pad):
    """transformers' own generate on the same left-padded batch (greedy)."""
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=batch.mm_token_type_ids, do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    return out[:, batch.input_ids.shape[1]:]


def test_encode_left_pads_and_expands_image_tokens(tiny, images):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # different text and image lengths
    assert (batch.attention_mask[:, -1] == 1).all()  # left padding: every row ends with a real token
    n_image = (batch.input_ids == proc.image_token_id).sum(1).tolist()
    assert n_image == [4, 6, 8] == (batch.image_grid_thw.prod(-1) // 4).tolist()
    text = proc.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    assert text.startswith("<|im_start|>system\n") and text.endswith("Hi<|im_end|>\n<|im_start|>assistant\n")


def test_positions_equal_transformers_rope_index(tiny, images):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    ref, _ = model.model.get_rope_index(batch.input_ids, batch.mm_token_type_ids, batch.image_grid_thw,
                                         attention_mask=batch.attention_mask)
    assert torch.equal(batch.position_ids, ref)
    assert (batch.position_ids[:, :, -1] + 1 < batch.attention_mask.sum(1)).all()  # images shorten positions


@pytest.mark.parametrize("cache_kind", vlm.CACHE_KINDS)
def test_greedy_equals_generate_token_for_token(tiny, images, cache_kind):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    free = vlm.sample_completions(model, batch, max_new_tokens=30, greedy=True, eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id, cache_kind=cache_kind)
    # EOS = tokens that the rows emit at different steps, so rows stop at different times
    eos = sorted({free.completion_ids[0, 4].item(), free.completion_ids[1, 9].item()})
    ours = vlm.sample_completions(model, batch, max_new_tokens=30, greedy=True, eos_token_ids=eos,
                                  pad_token_id=proc.pad_token_id, cache_kind=cache_kind)
    ref = generate_reference(model, batch, 30, eos, proc.pad_token_id)
    lengths = ours.completion_mask.sum(1).long().tolist()
    assert len(set(lengths)) >= 2 and min(lengths) < 30
    for i, n in enumerate(lengths):
        assert ours.completion_ids[i, :n].tolist() == ref[i, :n].tolist()
        if n < 30:
            assert ours.completion_ids[i, n - 1].item() in eos  # mask includes the EOS token
            assert (ours.completion_ids[i, n:] == proc.pad_token_id).all()


def test_seeded_sampling_is_reproducible(tiny, images):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    run = lambda seed: vlm.sample_completions(
        model, batch, group_size=2, max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50,
        generator=torch.Generator().manual_seed(seed), eos_token_ids=proc.eos_token_ids,
        pad_token_id=proc.pad_token_id).completion_ids
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("cache_kind", vlm.CACHE_KINDS)
def test_prefill_once_equals_repeated_batch(tiny, images, cache_kind):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    free = vlm.sample_completions(model, batch, max_new_tokens=20, greedy=True, eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id)
    eos = sorted(set(free.completion_ids[:, 2:6].flatten().tolist()))  # likely tokens: rows finish early
    kw = dict(max_new_tokens=20, temperature=0.5, eos_token_ids=eos, pad_token_id=proc.pad_token_id,
              cache_kind=cache_kind)
    once = vlm.sample_completions(model, batch, group_size=4, generator=torch.Generator().manual_seed(3), **kw)
    repeated = vlm.sample_completions(model, batch.repeat_interleave(4), group_size=1,
                                      generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(once.completion_ids, repeated.completion_ids)
    assert torch.equal(once.completion_mask, repeated.completion_mask)
    torch.testing.assert_close(once.logprobs, repeated.logprobs, atol=1e-5, rtol=0)
    assert len(set(once.completion_mask.sum(1).tolist())) > 1


def test_filter_logits_against_loop():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5)]:
        out = vlm.filter_logits(logits, top_k, top_p)
        for row, orow in zip(logits, out):
            order = row.argsort(descending=True).tolist()
            keep = set(order[:top_k] if top_k else order)
            probs = row.masked_fill(torch.tensor([i not in keep for i in range(50)]), float("-inf")).softmax(-1)
            mass, kept = 0.0, set()
            for i in order:
                if i in keep and mass < top_p:
                    kept.add(i)
                    mass += probs[i].item()
            assert {i for i in range(50) if orow[i] > float("-inf")} == kept


def test_scorer_equals_sampler_logprobs(tiny, images):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    roll = vlm.sample_completions(model, batch, group_size=2, max_new_tokens=16, temperature=0.7, top_p=0.9,
                                  generator=torch.Generator().manual_seed(0), eos_token_ids=proc.eos_token_ids,
                                  pad_token_id=proc.pad_token_id)
    rows = batch.repeat_interleave(2)
    with torch.no_grad():
        logp = vlm.sequence_logprobs(model, rows, roll.completion_ids, roll.completion_mask, temperature=0.7)
    torch.testing.assert_close(logp, roll.logprobs, atol=1e-4, rtol=0)

    # The silent fallback this guards against: a forward that leaves positions to transformers and passes
    # no mm_token_type_ids gets 1-D positions, and its log-probs differ — so the assertion above would fail.
    with torch.no_grad():
        out = model(input_ids=torch.cat([rows.input_ids, roll.completion_ids], 1),
                    attention_mask=torch.cat([rows.attention_mask, roll.completion_mask.long()], 1),
                    pixel_values=rows.pixel_values, image_grid_thw=rows.image_grid_thw)
    T = rows.input_ids.shape[1]
    L = roll.completion_ids.shape[1]
    fallback = (out.logits[:, T - 1:T - 1 + L].float() / 0.7).log_softmax(-1)
    fallback = fallback.gather(-1, roll.completion_ids[..., None])[..., 0] * roll.completion_mask
    assert (fallback - roll.logprobs).abs().max() > 1e-3


def test_chunked_scorer_equals_full_logits_with_gradients(tiny, images):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    ids, mask = proc.encode_completions(["<answer>red</answer>", "a", "<think>x</think> and more text"])
    weight = model.lm_head.weight

    def loss_of(fn):
        model.zero_grad()
        logp = fn()
        loss = (logp * torch.linspace(1, 2, logp.shape[1])).sum()
        loss.backward()
        return logp.detach(), weight.grad.clone()

    chunked = loss_of(lambda: vlm.sequence_logprobs(model, batch, ids, mask, temperature=0.9, chunk_size=3))

    def full():  # reference: the whole logits tensor at once
        T = batch.input_ids.shape[1]
        pos = batch.next_positions()[..., None] + torch.arange(ids.shape[1])
        out = model(input_ids=torch.cat([batch.input_ids, ids], 1),
                    attention_mask=torch.cat([batch.attention_mask, mask.long()], 1),
                    position_ids=torch.cat([batch.position_ids, pos], 2),
                    mm_token_type_ids=torch.cat([batch.mm_token_type_ids, torch.zeros_like(ids)], 1),
                    pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
        lp = (out.logits[:, T - 1:T - 1 + ids.shape[1]].float() / 0.9).log_softmax(-1)
        return lp.gather(-1, ids[..., None])[..., 0] * mask

    reference = loss_of(full)
    torch.testing.assert_close(chunked[0], reference[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[1], reference[1], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(chunked[1]).all()
    model.zero_grad()


def fresh_model(tiny_dir):
    return vlm.load_model(tiny_dir)


def test_lora_off_equals_base_and_merge_equals_unmerged(tiny_dir, tiny, images):
    _, proc = tiny
    base = fresh_model(tiny_dir)
    model = fresh_model(tiny_dir)
    n = vlm.add_lora(model, r=4, alpha=8, dropout=0.0)
    assert n == 7 * model.config.text_config.num_hidden_layers  # LM linear layers only
    assert not any(".visual." in f".{k}" for k, _ in model.named_parameters() if "lora_" in k)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in k or ".lora_B" in k for k in trainable)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: B != 0
        for m in vlm.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    batch = proc.encode(images, QUESTIONS)
    ids, mask = proc.encode_completions(["<answer>red square</answer>", "b", "c d e"])
    score = lambda m: vlm.sequence_logprobs(m, batch, ids, mask)
    with torch.no_grad():
        ref, lora_on = score(base), score(model)
        with vlm.lora_disabled(model):
            lora_off = score(model)
        assert torch.equal(lora_off, ref)
        assert (lora_on - ref).abs().max() > 1e-3
        vlm.merge_lora(model)
        assert not vlm.lora_modules(model)
        torch.testing.assert_close(score(model), lora_on, atol=1e-5, rtol=0)


def test_hand_written_step_uses_lora_and_equals_model_forward(tiny_dir, tiny, images):
    """The KVBuffer step calls the layers' own modules, so adapters count (and switch off) as in the
    model's forward: greedy samples of a LoRA model with B != 0, on and off, equal the reference path."""
    _, proc = tiny
    model = fresh_model(tiny_dir)
    vlm.add_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in vlm.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    batch = proc.encode(images, QUESTIONS)
    run = lambda kind: vlm.sample_completions(model, batch, group_size=2, max_new_tokens=12, greedy=True,
                                              eos_token_ids=[], pad_token_id=proc.pad_token_id, cache_kind=kind)
    on = run("buffer")
    assert torch.equal(on.completion_ids, run("dynamic").completion_ids)
    torch.testing.assert_close(on.logprobs, run("dynamic").logprobs, atol=1e-5, rtol=0)
    with vlm.lora_disabled(model):
        off = run("buffer")
        assert torch.equal(off.completion_ids, run("dynamic").completion_ids)
    assert not torch.equal(on.logprobs, off.logprobs)  # the adapters changed what was sampled


def test_save_load_round_trip_with_lora_merged(tiny_dir, tiny, images, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    _, proc = tiny
    model = fresh_model(tiny_dir)
    vlm.add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in vlm.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    batch = proc.encode(images, QUESTIONS)
    ids, mask = proc.encode_completions(["<answer>x</answer>", "y", "z"])
    with torch.no_grad():
        before = vlm.sequence_logprobs(model, batch, ids, mask)
    vlm.save_checkpoint(model, proc, str(tmp_path / "ckpt"))
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "adapter.safetensors", "adapter_config.json"} <= files
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        after = vlm.sequence_logprobs(loaded, batch, ids, mask)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # the adapter alone on a fresh base gives the same model
    again = vlm.load_adapter(fresh_model(tiny_dir), str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(vlm.sequence_logprobs(again, batch, ids, mask), before, atol=1e-6, rtol=0)
    proc2 = vlm.Processor.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(proc2.encode(images, QUESTIONS).input_ids, batch.input_ids)


def test_interrupted_save_leaves_previous_checkpoint(tiny_dir, tiny, tmp_path, monkeypatch):
    _, proc = tiny
    model = fresh_model(tiny_dir)
    path = str(tmp_path / "ckpt")
    vlm.save_checkpoint(model, proc, path)
    before = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}

    def crash(tmp):
        raise KeyboardInterrupt("killed mid-save")

    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        vlm.save_checkpoint(model, proc, path, write_files=crash)  # weights written, then the crash
    assert {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)} == before
    from transformers import Qwen2_5_VLForConditionalGeneration
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert torch.equal(reloaded.lm_head.weight, fresh_model(tiny_dir).lm_head.weight)


def test_train_state_round_trip_without_pickle(tiny_dir, tmp_path):
    model = fresh_model(tiny_dir)
    vlm.add_lora(model, r=2, alpha=4, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(11)
    vlm.save_train_state(str(tmp_path), step=7, optimizer=opt, generator=gen, extra={"data_pos": 3})
    expected_rand, expected_gen = torch.rand(3), torch.rand(3, generator=gen)
    meta, osd, tensors = vlm.load_train_state(str(tmp_path))
    opt2 = torch.optim.AdamW(params, lr=1e-3)
    opt2.load_state_dict(osd)
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(opt2.state_dict()["state"][k][name], v)
    gen2 = torch.Generator()
    vlm.restore_rng(meta, tensors, gen2)
    assert meta["step"] == 7 and meta["extra"] == {"data_pos": 3}
    assert torch.equal(torch.rand(3), expected_rand) and torch.equal(torch.rand(3, generator=gen2), expected_gen)


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
    roll = vlm.sample_completions(model, batch, max_new_tokens=5, greedy=True, eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id)
    ref = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                         max_new_tokens=5, pad_token_id=proc.pad_token_id)[:, batch.input_ids.shape[1]:]
    assert torch.equal(roll.completion_ids, ref)


def test_build_tiny_model_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    vlm.build_tiny_model(a, seed=3, corpus=["red triangle", "blue square"])
    vlm.build_tiny_model(b, seed=3, corpus=["red triangle", "blue square"])
    for f in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f


@pytest.mark.parametrize("cache_kind", vlm.CACHE_KINDS)
def test_dropping_finished_rows_changes_nothing(tiny, images, cache_kind):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    free = vlm.sample_completions(model, batch, group_size=2, max_new_tokens=20, temperature=0.5,
                                  generator=torch.Generator().manual_seed(0), eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id)
    eos = sorted(set(free.completion_ids[:, 2:8].flatten().tolist()))
    kw = dict(group_size=2, max_new_tokens=20, greedy=True, eos_token_ids=eos, pad_token_id=proc.pad_token_id,
              cache_kind=cache_kind)
    kept = vlm.sample_completions(model, batch, compact_at=0.0, **kw)     # never drop rows
    dropped = vlm.sample_completions(model, batch, compact_at=1.0, **kw)  # drop at every finish
    assert (kept.completion_mask.sum(1) < 20).any()
    assert torch.equal(kept.completion_ids, dropped.completion_ids)
    torch.testing.assert_close(kept.logprobs, dropped.logprobs, atol=1e-5, rtol=0)


class _LovesToken(torch.nn.Module):
    """An LM head with a large bonus on one token's logit: the model would sample that token every step."""

    def __init__(self, head, token):
        super().__init__()
        self.head, self.token = head, token

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.token] += 50.0
        return logits


def test_vision_tokens_are_never_sampled(tiny, images, monkeypatch):
    """A sampled <|image_pad|> would make the scorer's forward over prompt + completion see more image
    tokens than the image has features (a crash seen in a GRPO run at temperature 1.5)."""
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    head = model.lm_head
    monkeypatch.setattr(model, "lm_head", _LovesToken(head, proc.image_token_id))
    biased = model
    kw = dict(group_size=2, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    unguarded = vlm.sample_completions(biased, batch, eos_token_ids=proc.eos_token_ids, pad_token_id=proc.pad_token_id, **kw)
    assert (unguarded.completion_ids == proc.image_token_id).all()  # the bias works: the test can fail
    guarded = vlm.sample_completions(biased, batch, **proc.sampling_tokens, **kw)
    assert proc.image_token_id in proc.banned_token_ids and len(proc.banned_token_ids) == 4
    assert not torch.isin(guarded.completion_ids, torch.tensor(proc.banned_token_ids)).any()
    assert guarded.completion_mask.sum() > 0
    monkeypatch.setattr(model, "lm_head", head)
    with torch.no_grad():  # the guarded completions score fine (the unguarded ones would crash here)
        vlm.sequence_logprobs(model, batch.repeat_interleave(2), guarded.completion_ids, guarded.completion_mask)


def test_missing_model_folder_names_the_folder(tmp_path):
    missing = str(tmp_path / "run" / "final")
    with pytest.raises(FileNotFoundError, match="model folder not found: .*run/final"):
        vlm.load_model(missing)


def test_every_cache_kind_samples_the_same(tiny, images):
    """The hand-written step over a KVBuffer (the default) and the model's own forward over StaticCache,
    against the model's forward over DynamicCache: sampling G per prompt with rows finishing early (so
    finished rows are dropped from every cache along the way)."""
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    free = vlm.sample_completions(model, batch, max_new_tokens=20, greedy=True, eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id)
    eos = sorted(set(free.completion_ids[:, 3:7].flatten().tolist()))
    run = lambda kind: vlm.sample_completions(model, batch, group_size=3, max_new_tokens=20, temperature=0.8,
                                              generator=torch.Generator().manual_seed(5), eos_token_ids=eos,
                                              pad_token_id=proc.pad_token_id, cache_kind=kind)
    dynamic = run("dynamic")
    assert len(set(dynamic.completion_mask.sum(1).tolist())) > 1  # rows stopped at different steps
    for kind in ("buffer", "static"):
        other = run(kind)
        assert torch.equal(other.completion_ids, dynamic.completion_ids), kind
        torch.testing.assert_close(other.logprobs, dynamic.logprobs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown cache kind"):
        run("paged")


def test_draw_follows_the_distribution():
    """The inverse-CDF draw against the probabilities it draws from (and never an impossible token)."""
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    logp = p.log().expand(20000, -1).contiguous()
    tok = vlm.draw(logp, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    assert freq[1] == 0 and freq[5] == 0  # zero probability (masked / filtered): never drawn
    torch.testing.assert_close(freq, p, atol=0.012, rtol=0)  # ~4 standard errors at n = 20000
    assert torch.equal(tok, vlm.draw(logp, torch.Generator().manual_seed(0)))  # seeded
    # rows keep their own distributions, and a row with one possible token always draws it
    rows = torch.tensor([[0.0, float("-inf"), float("-inf")], [float("-inf"), float("-inf"), 0.0]])
    assert vlm.draw(rows.repeat(50, 1), torch.Generator().manual_seed(1)).tolist() == [0, 2] * 50


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (issue 8's bf16 check of the fast path)"))])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 0.05)])
def test_hand_written_step_logits_equal_model_forward(tiny_dir, images, dtype, tol, device):
    """Step by step, teacher-forced on the same tokens (so the two paths never diverge): the logits of
    `_decode_step_buffer` over a KVBuffer against the model's own forward over a DynamicCache, in fp32
    (to float error) and in bf16 (the dtype of GPU runs; on this CPU the two agreed exactly). One position
    off in the rotary embedding moves the logits by ~3, so the check has teeth."""
    from transformers import DynamicCache
    model = vlm.load_model(tiny_dir, device, dtype=dtype)
    proc = vlm.Processor.from_pretrained(tiny_dir)
    batch = proc.encode(images, QUESTIONS).to(device)
    max_len = batch.input_ids.shape[1] + 10

    def prefill():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, pixel_values=batch.pixel_values.to(model.dtype),
                        image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids,
                        use_cache=True, **{vlm._cache_kwarg(): cache})
        return cache, out.logits[:, -1]

    ref_cache, first = prefill()
    buffer = vlm.KVBuffer(prefill()[0], batch.attention_mask, max_len)
    tokens = torch.randint(10, 200, (len(images), 8), generator=torch.Generator().manual_seed(0)).to(device)
    mask, positions = batch.attention_mask, batch.next_positions()
    worst = 0.0
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            ref = vlm._decode_step(model, tokens[:, t], mask, positions, ref_cache).float()
            ours = vlm._decode_step_buffer(model, tokens[:, t], positions, buffer).float()
            worst = max(worst, (ours - ref).abs().max().item())
            positions = positions + 1
    assert worst <= tol, worst
    assert first.float().abs().max() > 1.0  # logits of a real size: the tolerance is not vacuous
