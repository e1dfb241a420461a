"""engine.py, the sampler, against slow, obviously-correct references: model.generate, the model's own
forward, repeated batches, loops (CPU, fp32, tiny model)."""
import pytest
import torch

import engine
import lora
import trainer
import vlm
from conftest import QUESTIONS, random_image

def generate_reference(model, batch, max_new_tokens, eos, pad):
    """transformers' own generate on the same left-padded batch (greedy)."""
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=batch.mm_token_type_ids, do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    return out[:, batch.input_ids.shape[1]:]


@pytest.mark.parametrize("cache_kind", engine.CACHE_KINDS)
def test_greedy_equals_generate_token_for_token(tiny, images, cache_kind):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    free = engine.sample_completions(model, batch, max_new_tokens=30, greedy=True, eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id, cache_kind=cache_kind)
    # EOS = tokens that the rows emit at different steps, so rows stop at different times
    eos = sorted({free.completion_ids[0, 4].item(), free.completion_ids[1, 9].item()})
    ours = engine.sample_completions(model, batch, max_new_tokens=30, greedy=True, eos_token_ids=eos,
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
    run = lambda seed: engine.sample_completions(
        model, batch, group_size=2, max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50,
        generator=torch.Generator().manual_seed(seed), eos_token_ids=proc.eos_token_ids,
        pad_token_id=proc.pad_token_id).completion_ids
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("cache_kind", engine.CACHE_KINDS)
def test_prefill_once_equals_repeated_batch(tiny, images, cache_kind):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    free = engine.sample_completions(model, batch, max_new_tokens=20, greedy=True, eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id)
    eos = sorted(set(free.completion_ids[:, 2:6].flatten().tolist()))  # likely tokens: rows finish early
    kw = dict(max_new_tokens=20, temperature=0.5, eos_token_ids=eos, pad_token_id=proc.pad_token_id,
              cache_kind=cache_kind)
    once = engine.sample_completions(model, batch, group_size=4, generator=torch.Generator().manual_seed(3), **kw)
    repeated = engine.sample_completions(model, batch.repeat_interleave(4), group_size=1,
                                      generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(once.completion_ids, repeated.completion_ids)
    assert torch.equal(once.completion_mask, repeated.completion_mask)
    torch.testing.assert_close(once.logprobs, repeated.logprobs, atol=1e-5, rtol=0)
    assert len(set(once.completion_mask.sum(1).tolist())) > 1


def test_filter_logits_against_loop():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5)]:
        out = engine.filter_logits(logits, top_k, top_p)
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


def fresh_model(tiny_dir):
    return vlm.load_model(tiny_dir)


def test_hand_written_step_uses_lora_and_equals_model_forward(tiny_dir, tiny, images):
    """The KVBuffer step calls the layers' own modules, so adapters count (and switch off) as in the
    model's forward: greedy samples of a LoRA model with B != 0, on and off, equal the reference path."""
    _, proc = tiny
    model = fresh_model(tiny_dir)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    batch = proc.encode(images, QUESTIONS)
    run = lambda kind: engine.sample_completions(model, batch, group_size=2, max_new_tokens=12, greedy=True,
                                              eos_token_ids=[], pad_token_id=proc.pad_token_id, cache_kind=kind)
    on = run("buffer")
    assert torch.equal(on.completion_ids, run("dynamic").completion_ids)
    torch.testing.assert_close(on.logprobs, run("dynamic").logprobs, atol=1e-5, rtol=0)
    with lora.lora_disabled(model):
        off = run("buffer")
        assert torch.equal(off.completion_ids, run("dynamic").completion_ids)
    assert not torch.equal(on.logprobs, off.logprobs)  # the adapters changed what was sampled


@pytest.mark.parametrize("cache_kind", engine.CACHE_KINDS)
def test_dropping_finished_rows_changes_nothing(tiny, images, cache_kind):
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    free = engine.sample_completions(model, batch, group_size=2, max_new_tokens=20, temperature=0.5,
                                  generator=torch.Generator().manual_seed(0), eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id)
    eos = sorted(set(free.completion_ids[:, 2:8].flatten().tolist()))
    kw = dict(group_size=2, max_new_tokens=20, greedy=True, eos_token_ids=eos, pad_token_id=proc.pad_token_id,
              cache_kind=cache_kind)
    kept = engine.sample_completions(model, batch, compact_at=0.0, **kw)     # never drop rows
    dropped = engine.sample_completions(model, batch, compact_at=1.0, **kw)  # drop at every finish
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


def test_vision_tokens_are_never_sampled(tiny_dir, tiny, images):
    """A sampled <|image_pad|> would make the scorer's forward over prompt + completion see more image
    tokens than the image has features (a crash seen in a GRPO run at temperature 1.5)."""
    _, proc = tiny
    model = vlm.load_model(tiny_dir)  # its own copy: its LM head is swapped below
    batch = proc.encode(images, QUESTIONS)
    head = model.lm_head
    model.lm_head = _LovesToken(head, proc.image_token_id)
    kw = dict(group_size=2, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    unguarded = engine.sample_completions(model, batch, eos_token_ids=proc.eos_token_ids,
                                          pad_token_id=proc.pad_token_id, **kw)
    assert (unguarded.completion_ids == proc.image_token_id).all()  # the bias works: the test can fail
    guarded = engine.sample_completions(model, batch, **proc.sampling_tokens, **kw)
    assert proc.image_token_id in proc.banned_token_ids and len(proc.banned_token_ids) == 4
    assert not torch.isin(guarded.completion_ids, torch.tensor(proc.banned_token_ids)).any()
    assert guarded.completion_mask.sum() > 0
    model.lm_head = head
    with torch.no_grad():  # the guarded completions score fine (the unguarded ones would crash here)
        trainer.sequence_logprobs(model, batch.repeat_interleave(2), guarded.completion_ids, guarded.completion_mask)


def test_every_cache_kind_samples_the_same(tiny, images):
    """The hand-written step over a KVBuffer (the default) and the model's own forward over StaticCache,
    against the model's forward over DynamicCache: sampling G per prompt with rows finishing early (so
    finished rows are dropped from every cache along the way)."""
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    free = engine.sample_completions(model, batch, max_new_tokens=20, greedy=True, eos_token_ids=[],
                                  pad_token_id=proc.pad_token_id)
    eos = sorted(set(free.completion_ids[:, 3:7].flatten().tolist()))
    run = lambda kind: engine.sample_completions(model, batch, group_size=3, max_new_tokens=20, temperature=0.8,
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
    tok = engine.draw(logp, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    assert freq[1] == 0 and freq[5] == 0  # zero probability (masked / filtered): never drawn
    torch.testing.assert_close(freq, p, atol=0.012, rtol=0)  # ~4 standard errors at n = 20000
    assert torch.equal(tok, engine.draw(logp, torch.Generator().manual_seed(0)))  # seeded
    # rows keep their own distributions, and a row with one possible token always draws it
    rows = torch.tensor([[0.0, float("-inf"), float("-inf")], [float("-inf"), float("-inf"), 0.0]])
    assert engine.draw(rows.repeat(50, 1), torch.Generator().manual_seed(1)).tolist() == [0, 2] * 50


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (the bf16 check of the fast path on CUDA)"))])
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
                        use_cache=True, **{engine.cache_kwarg(): cache})
        return cache, out.logits[:, -1]

    ref_cache, first = prefill()
    buffer = engine.KVBuffer(prefill()[0], batch.attention_mask, max_len)
    tokens = torch.randint(10, 200, (len(images), 8), generator=torch.Generator().manual_seed(0)).to(device)
    mask, positions = batch.attention_mask, batch.next_positions()
    worst = 0.0
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            ref = engine.decode_step_model(model, tokens[:, t], mask, positions, ref_cache).float()
            ours = engine.decode_step_buffer(model, tokens[:, t], positions, buffer).float()
            worst = max(worst, (ours - ref).abs().max().item())
            positions = positions + 1
    assert worst <= tol, worst
    assert first.float().abs().max() > 1.0  # logits of a real size: the tolerance is not vacuous


def test_a_length_beyond_the_context_is_refused_before_anything_is_allocated(tiny):
    """--max_new_tokens 1e9 once tried to allocate terabytes of KV cache before failing without naming a flag."""
    model, proc = tiny
    batch = proc.encode([random_image(56, 56, 0)], ["Hi"])
    context = model.config.get_text_config().max_position_embeddings
    with pytest.raises(ValueError, match=rf"--max_new_tokens 1000000000: .* context of {context} tokens"):
        engine.sample_completions(model, batch, max_new_tokens=10 ** 9, **proc.sampling_tokens)
    engine.check_context(model, context - batch.input_ids.shape[1], batch.input_ids.shape[1])  # just fits


# ----------------------------------------------------------------------------------------------------
# the static decode step (cache kinds "static_eager" and "compiled")

def test_static_step_logits_equal_model_forward(tiny, images):
    """Teacher-forced, step by step: `static_logits` over a StaticKV bucket (attention over the whole
    buffer under the mask, grouped queries packed, positions from the write column) against the model's
    own forward over a DynamicCache, fp32, to 1e-5. Padding rows (the bucket holds 8) are ignored."""
    from transformers import DynamicCache
    model, proc = tiny
    batch = proc.encode(images, QUESTIONS)
    width, G = batch.input_ids.shape[1], 2

    def prefill():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                        image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids,
                        use_cache=True, **{engine.cache_kwarg(): cache})
        return cache, out.logits[:, -1]

    ref_cache, first = prefill()
    engine.repeat_cache_rows(ref_cache, G)
    tc, attn = model.config.text_config, model.model.language_model.layers[0].self_attn
    kv = engine.StaticKV(tc.num_hidden_layers, 8, tc.num_key_value_heads, 128, attn.head_dim, torch.float32,
                         "cpu")
    for t in kv.keys + kv.values:  # an earlier call's columns (finite: a NaN would poison even masked ones)
        t.normal_(generator=torch.Generator().manual_seed(2))
    src = kv.fill(prefill()[0], batch.attention_mask, G)
    n = len(images) * G
    tokens = torch.randint(10, 200, (n, 8), generator=torch.Generator().manual_seed(0))
    mask = batch.attention_mask.repeat_interleave(G, 0)
    positions = batch.next_positions().repeat_interleave(G, 1)
    pos0 = batch.next_positions().index_select(1, src) - width
    col = torch.tensor([width])
    worst = 0.0
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            ref = engine.decode_step_model(model, tokens[:, t], mask, positions, ref_cache)
            padded = torch.cat([tokens[:, t], tokens[:1, t].expand(8 - n)])
            ours = engine.static_logits(model, padded, pos0, col, kv.keys, kv.values, kv.valid)[:n]
            worst = max((ours - ref).abs().max().item(), worst)  # NaN first: max keeps it
            positions, col = positions + 1, col + 1
    assert worst <= 1e-5, worst
    assert first.abs().max() > 1.0  # logits of a real size: the tolerance is not vacuous


def _eos_of(model, proc, batch):
    """EOS ids that the rows of a greedy run emit at different steps, so rows end at different steps, all
    before the end check at step 16 (the loop then stops early and trims)."""
    free = engine.sample_completions(model, batch, max_new_tokens=30, greedy=True, eos_token_ids=[],
                                     pad_token_id=proc.pad_token_id)
    return sorted({free.completion_ids[0, 4].item(), free.completion_ids[1, 9].item(),
                   free.completion_ids[2, 14].item()})


SAMPLING = dict(group_size=2, max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=50)
OTHER_QUESTIONS = ["Name it.", "What is this?", "Describe the picture in a few words, please, then answer."]


@pytest.fixture(scope="module")
def compiled_runs(tiny):
    """The compiled step's runs, compiled once per module (and family): greedy with rows ending at
    different steps, then seeded sampling at two prompt widths of one bucket, the second under
    fail_on_recompile (a recompile or a graph break raises)."""
    model, proc = tiny
    images = [random_image(56, 56, 0), random_image(84, 56, 1), random_image(56, 112, 2)]
    batch, other = proc.encode(images, QUESTIONS), proc.encode(images, OTHER_QUESTIONS)
    eos = _eos_of(model, proc, batch)
    kw = dict(eos_token_ids=eos, pad_token_id=proc.pad_token_id, cache_kind="compiled")
    greedy = engine.sample_completions(model, batch, max_new_tokens=30, greedy=True, **kw)
    sampled = engine.sample_completions(model, batch, seeds=[1, 2, 3], **SAMPLING, **kw)
    with torch.compiler.set_stance("fail_on_recompile"):
        widened = engine.sample_completions(model, other, seeds=[1, 2, 3], **SAMPLING, **kw)
    return dict(batch=batch, other=other, eos=eos, greedy=greedy, sampled=sampled, widened=widened)


@pytest.mark.parametrize("cache_kind", engine.STATIC_KINDS)
def test_static_greedy_equals_generate_token_for_token(tiny, compiled_runs, cache_kind):
    model, proc = tiny
    batch, eos = compiled_runs["batch"], compiled_runs["eos"]
    ours = compiled_runs["greedy"] if cache_kind == "compiled" else engine.sample_completions(
        model, batch, max_new_tokens=30, greedy=True, eos_token_ids=eos, pad_token_id=proc.pad_token_id,
        cache_kind=cache_kind)
    ref = generate_reference(model, batch, 30, eos, proc.pad_token_id)
    lengths = ours.completion_mask.sum(1).long().tolist()
    assert len(set(lengths)) >= 2 and max(lengths) < 30  # rows end at different steps, all before the limit
    assert ours.completion_ids.shape[1] == max(lengths)  # trimmed where the eager loop stops
    for i, n in enumerate(lengths):
        assert ours.completion_ids[i, :n].tolist() == ref[i, :n].tolist()
        assert ours.completion_ids[i, n - 1].item() in eos
        assert (ours.completion_ids[i, n:] == proc.pad_token_id).all()
    assert ours.host_syncs <= -(-30 // engine.STOP_EVERY)


def test_compiled_samples_what_eager_static_samples(tiny, compiled_runs):
    """Seeded sampling (temperature, top-k, top-p), rows ending at different steps: the compiled step
    draws the same tokens as the same step uncompiled, log-probs to 1e-5, at both prompt widths."""
    model, proc = tiny
    for name, batch in (("sampled", compiled_runs["batch"]), ("widened", compiled_runs["other"])):
        eager = engine.sample_completions(model, batch, seeds=[1, 2, 3], eos_token_ids=compiled_runs["eos"],
                                          pad_token_id=proc.pad_token_id, cache_kind="static_eager",
                                          **SAMPLING)
        compiled = compiled_runs[name]
        assert torch.equal(compiled.completion_ids, eager.completion_ids), name
        assert torch.equal(compiled.completion_mask, eager.completion_mask), name
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=0)
        assert len(set(eager.completion_mask.sum(1).tolist())) > 1  # rows stopped at different steps
    assert compiled_runs["batch"].input_ids.shape[1] != compiled_runs["other"].input_ids.shape[1]


def test_static_rows_draw_from_their_own_streams(tiny, images):
    """A row's samples depend on its prompt's seed, not on the prompts that share its batch; and the
    seeds matter."""
    model, proc = tiny
    kw = dict(eos_token_ids=[], pad_token_id=proc.pad_token_id, cache_kind="static_eager", **SAMPLING)
    batch = proc.encode(images, QUESTIONS)
    together = engine.sample_completions(model, batch, seeds=[7, 8, 9], **kw)
    alone = engine.sample_completions(model, batch.select([1]), seeds=[8], **kw)
    assert torch.equal(together.completion_ids[2:4], alone.completion_ids)
    torch.testing.assert_close(together.logprobs[2:4], alone.logprobs, atol=1e-5, rtol=0)
    assert not torch.equal(alone.completion_ids, engine.sample_completions(
        model, batch.select([1]), seeds=[5], **kw).completion_ids)


def test_static_step_compiles_to_one_graph_across_prompt_widths(tiny, images, monkeypatch):
    """Two calls with different prompt widths in one bucket: one graph, no graph break (fullgraph)."""
    from torch._dynamo.testing import CompileCounter
    model, proc = tiny
    counter = CompileCounter()
    step = torch.compile(engine.decode_step_static, backend=counter, fullgraph=True, dynamic=False)
    monkeypatch.setattr(engine, "compiled_step", lambda cuda_graphs: step)
    kw = dict(eos_token_ids=[], pad_token_id=proc.pad_token_id, cache_kind="compiled", **SAMPLING)
    a = proc.encode(images, QUESTIONS)
    b = proc.encode(images, OTHER_QUESTIONS)
    assert a.input_ids.shape[1] != b.input_ids.shape[1]
    engine.sample_completions(model, a, seeds=[1, 2, 3], **kw)
    engine.sample_completions(model, b, seeds=[1, 2, 3], **kw)
    assert counter.frame_count == 1


def test_decode_flag_names_a_cache_kind():
    """--decode, on every stage that samples: eager (the buffer step) by default, each choice a cache kind."""
    import argparse
    from common import add_sampling_args
    ap = argparse.ArgumentParser()
    add_sampling_args(ap, num_samples=1, prompts_per_call=1, max_new_tokens=1)
    assert engine.DECODE_KINDS[ap.parse_args([]).decode] == "buffer"
    kinds = engine.CACHE_KINDS + engine.STATIC_KINDS
    for choice in ("eager", "static", "compiled"):
        assert engine.DECODE_KINDS[ap.parse_args(["--decode", choice]).decode] in kinds


def test_cuda_graphs_only_over_weights_that_stay_put():
    """The compiled step replays CUDA graphs on CUDA, but not over FSDP2's gathered weights (they move
    between rollouts), nor on the CPU."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    cuda = torch.device("cuda")  # only a device's name: graphs_fit looks at its type
    assert engine.graphs_fit(torch.nn.Sequential(torch.nn.Linear(2, 2)), cuda)
    assert not engine.graphs_fit(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.device("cpu"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = torch.nn.Sequential(torch.nn.Linear(2, 2))
        fully_shard(sharded[0])
        assert not engine.graphs_fit(sharded, cuda)
    finally:
        dist.destroy_process_group()
