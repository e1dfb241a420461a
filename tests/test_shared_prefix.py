"""The shared-prefix training forward against the per-row forward it replaces (trainer.sequence_logprobs with
shared_prefix=False: one prompt ⊕ completion row per completion, the slow, obviously-correct reference).

Both must give the same per-token log-probs and entropies, and the same gradient in every parameter,
vision tower included: the shared forward runs each prompt once and sums its completions' gradients into
it, the per-row forward runs it once per completion and the parameters sum the copies' gradients."""
import pytest
import torch

import lora
import trainer
import vlm
from conftest import QUESTIONS, random_image


def completions(n, L, proc, seed):
    """n random completions of uneven lengths (1..L tokens, right-padded), none of them a vision token."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(proc.tokenizer)
    ids = torch.randint(0, vocab, (n, L), generator=g)
    for banned in proc.banned_token_ids:
        ids[ids == banned] = proc.pad_token_id
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    lengths[0] = L  # one row uses every column
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    return ids * mask.long() + proc.pad_token_id * (1 - mask.long()), mask


def scored(model, batch, ids, mask, rows, shared, temperature=0.8):
    """Log-probs, entropies and every parameter's gradient of a loss that weighs each token differently."""
    model.zero_grad(set_to_none=True)
    logp, entropy = trainer.sequence_logprobs(model, batch, ids, mask, prompt_rows=rows, temperature=temperature,
                                          return_entropy=True, shared_prefix=shared)
    weights = torch.linspace(0.5, 2.0, logp.numel()).view_as(logp)
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), entropy, grads


def assert_same(a, b, rel=1e-5):
    """fp32: log-probs and entropies to 1e-5, each gradient to 1e-5 of its largest entry."""
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
    assert a[2].keys() == b[2].keys() and len(a[2]) > 0
    for name in a[2]:
        ref = b[2][name]
        err = float((a[2][name] - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        assert err <= rel, (name, err)


@pytest.fixture
def trainable_model(tiny_dir):
    """A fresh tiny model with every parameter trainable, the vision tower's included."""
    model = vlm.load_model(tiny_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.fixture
def prompts(tiny, images):
    """Three prompts of different image sizes and question lengths: left padding differs per row."""
    return tiny[1].encode(images, QUESTIONS)


@pytest.mark.parametrize("G", [1, 2, 5])
def test_groups_equal_per_row(trainable_model, tiny, prompts, G, family):
    proc = tiny[1]
    ids, mask = completions(3 * G, 9, proc, seed=G)
    rows = [i // G for i in range(3 * G)]
    shared = scored(trainable_model, prompts, ids, mask, rows, shared=True)
    per_row = scored(trainable_model, prompts, ids, mask, rows, shared=False)
    assert_same(shared, per_row)
    assert any(".visual." in f".{n}" for n in shared[2])  # the vision tower's gradient is compared too
    if family == "qwen3_vl":  # DeepStack: the inner blocks' features reach the packed rows' image positions
        assert any(".deepstack_merger_list." in n for n in shared[2])
    assert per_row[0].abs().max() > 1.0  # log-probs of a real size: the tolerance is not vacuous


def test_tapo_rows_and_split_groups(trainable_model, tiny, images):
    """TAPO: each item has an anchor and a positive prompt row, G/2 completions on each (or all G on the
    anchor: --tapo_anchor_only); a micro-batch may also hold part of a group or rows in any order."""
    proc = tiny[1]
    items = [images[0], images[1], images[2], random_image(56, 84, 5)]   # (anchor, positive) x 2 items
    batch = proc.encode(items, [QUESTIONS[1]] * 2 + [QUESTIONS[2]] * 2)
    ids, mask = completions(8, 7, proc, seed=11)
    for rows in ([0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 2, 2, 2, 2], [3, 1, 3, 0, 1, 3, 2, 0]):
        assert_same(scored(trainable_model, batch, ids, mask, rows, shared=True),
                    scored(trainable_model, batch, ids, mask, rows, shared=False))


def test_the_vision_tower_and_prompt_run_once_per_prompt_row(trainable_model, tiny, prompts):
    proc = tiny[1]
    G = 4
    ids, mask = completions(3 * G, 6, proc, seed=3)
    rows = [i // G for i in range(3 * G)]
    seen = []
    hook = trainable_model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    tokens = []
    hook2 = trainable_model.model.language_model.register_forward_hook(
        lambda m, args, kwargs, out: tokens.append(out.last_hidden_state.shape[:2]), with_kwargs=True)
    try:
        for shared in (True, False):
            with torch.no_grad():
                trainer.sequence_logprobs(trainable_model, prompts, ids, mask, prompt_rows=rows, shared_prefix=shared)
    finally:
        hook.remove()
        hook2.remove()
    patches = int(prompts.image_grid_thw.prod(-1).sum())
    assert seen == [patches, G * patches]  # shared: each image once; per row: once per completion
    (r_shared, s_shared), (r_rows, s_rows) = tokens
    assert r_shared == 3 and r_rows == 3 * G
    assert r_shared * s_shared < r_rows * s_rows / 2  # far fewer positions through the language model


def test_lora_and_its_reference_pass(tiny_dir, tiny, prompts):
    """LoRA adapters on the language model and the vision tower (dropout off: the two forwards would
    draw different masks), and the KL reference pass with the adapters switched off."""
    proc = tiny[1]
    model = vlm.load_model(tiny_dir)
    trainer.configure_trainable(model, lora_r=4, lora_alpha=8, lora_dropout=0.0, train_vision=True)
    for name, p in model.named_parameters():  # adapters start at B = 0: move them so they matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    ids, mask = completions(6, 8, proc, seed=4)
    rows = [0, 0, 1, 1, 2, 2]
    shared = scored(model, prompts, ids, mask, rows, shared=True)
    assert_same(shared, scored(model, prompts, ids, mask, rows, shared=False))
    assert all("lora_" in n for n in shared[2]) and any(".visual." in f".{n}" for n in shared[2])
    with torch.no_grad(), lora.lora_disabled(model):
        off = [trainer.sequence_logprobs(model, prompts, ids, mask, prompt_rows=rows, shared_prefix=s) for s in (True, False)]
    torch.testing.assert_close(off[0], off[1], atol=1e-5, rtol=0)
    assert (off[0] - shared[0]).abs().max() > 1e-3  # the adapters were really off


def test_gradient_checkpointing(trainable_model, tiny, prompts):
    proc = tiny[1]
    ids, mask = completions(6, 8, proc, seed=5)
    rows = [0, 0, 1, 1, 2, 2]
    plain = scored(trainable_model, prompts, ids, mask, rows, shared=False)
    trainable_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable_model.train()
    assert_same(scored(trainable_model, prompts, ids, mask, rows, shared=True), plain)
    assert_same(scored(trainable_model, prompts, ids, mask, rows, shared=False), plain)


def test_eager_attention_takes_the_additive_mask(tiny_dir, tiny, prompts):
    proc = tiny[1]
    model = vlm.load_model(tiny_dir, attn="eager")
    ids, mask = completions(6, 8, proc, seed=6)
    rows = [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        eager = trainer.sequence_logprobs(model, prompts, ids, mask, prompt_rows=rows, shared_prefix=True)
        reference = trainer.sequence_logprobs(vlm.load_model(tiny_dir), prompts, ids, mask, prompt_rows=rows,
                                          shared_prefix=False)
    torch.testing.assert_close(eager, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (bf16 autocast as training runs it)"))])
def test_bf16(tiny_dir, tiny, images, device):
    """bf16 weights (CPU) or fp32 weights under bf16 autocast (CUDA, as training runs): the two forwards
    agree to the tolerance of the bf16 scorer checks (tests/test_engine.py), gradients included."""
    proc = tiny[1]
    dtype = "fp32" if device == "cuda" else "bf16"
    model = vlm.load_model(tiny_dir, device, dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = proc.encode(images, QUESTIONS).to(device)
    ids, mask = (t.to(device) for t in completions(6, 8, proc, seed=7))
    rows = [0, 0, 1, 1, 2, 2]
    with trainer.autocast(device, True):
        shared, per_row = (scored(model, batch, ids, mask, rows, shared=s) for s in (True, False))
    torch.testing.assert_close(shared[0], per_row[0], atol=0.05, rtol=0)
    for name in per_row[2]:
        ref = per_row[2][name].float()
        assert float((shared[2][name].float() - ref).abs().max()) <= 0.05 * max(float(ref.abs().max()), 1e-6), name


def test_layout_attends_as_documented(tiny, prompts):
    """The packed mask, entry by entry, against the rule written out: a prompt token sees earlier real
    prompt tokens; a completion token sees its prompt's real tokens and its own earlier real tokens."""
    proc = tiny[1]
    ids, mask = completions(4, 5, proc, seed=8)
    mask[2, 1] = 0  # a hole inside a completion: never attended to
    rows = [2, 0, 2, 2]
    pack = trainer.shared_prefix_layout(prompts, rows, ids, mask)
    Tp = pack.prompts.input_ids.shape[1]
    lengths = trainer.completion_lengths(mask).tolist()
    owner, real = {}, {}
    for r in range(pack.input_ids.shape[0]):
        for t in range(Tp):
            owner[r, t], real[r, t] = "prompt", bool(pack.prompts.attention_mask[r, t])
    starts = {}
    for i, row in enumerate(rows):
        r = [2, 0].index(row)
        s = starts.get(r, Tp)
        for t in range(lengths[i]):
            owner[r, s + t], real[r, s + t] = i, bool(mask[i, t])
            assert pack.input_ids[r, s + t] == ids[i, t]
        starts[r] = s + lengths[i]
        assert pack.gather_cols[i, 0] == Tp - 1 and pack.gather_cols[i, 1:lengths[i]].tolist() == list(range(s, s + lengths[i] - 1))
    R, S = pack.input_ids.shape
    for r in range(R):
        for q in range(S):
            rule = [k <= q and (r, q) in owner and real.get((r, k), False) and owner[r, k] in ("prompt", owner[r, q])
                    for k in range(S)]
            if not any(rule):  # padding (left of a prompt, right of a row's last completion): itself only
                rule = [k == q for k in range(S)]
            assert pack.attend[r, 0, q].tolist() == rule, (r, q)
