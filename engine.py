"""engine.py — sampling with a KV cache, by hand (Qwen2.5-VL, Qwen3-VL): what GRPO, mining and evaluation decode with.

`sample_completions(model, batch, group_size=G, ...)`:
  1. prefill: one forward over the P left-padded prompts (vision tower + prompt), caching keys/values;
  2. replicate: each prompt's cache G times in a row, so the G samples of a GRPO group share one prefill;
  3. decode: one token per row per step, with explicit M-RoPE positions (transformers must never infer
     them when decoding by hand), until every row has emitted an EOS or the length limit is reached;
     finished rows are dropped from the cache once enough of them have stopped.
The default decode step (`decode_step_buffer`) runs the layers' own modules over a preallocated KV
buffer written in place; `decode_step_model` runs the model's own forward over a transformers cache and
is the reference it is tested against. Opt-in (`--decode static|compiled`, cache kinds "static_eager" /
"compiled"): `decode_step_static`, the same step at one shape per size bucket (KV buffer reused across
calls, attention over all of it under a mask, no host sync inside), eager or under torch.compile, in a
loop that checks for the end every 16 tokens. All are checked against `model.generate` token for token:

    python engine.py --model out/toy/seed_0/start/final  # greedy: ours vs model.generate, and their times
"""

import argparse
import functools
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CACHE_KINDS = ("buffer", "static", "dynamic")
STATIC_KINDS = ("static_eager", "compiled")  # the static step (StaticKV), uncompiled and compiled
DECODE_KINDS = {"eager": "buffer", "static": "static_eager", "compiled": "compiled"}  # --decode -> cache_kind


@dataclass
class Completions:
    completion_ids: torch.Tensor   # (P·G, L) sampled tokens, pad after the end; prompt-major rows
    completion_mask: torch.Tensor  # (P·G, L) float, 1 up to and including the first EOS
    logprobs: torch.Tensor         # (P·G, L) log-prob of each sampled token under softmax(logits / T)
    host_syncs: int = 0            # end checks that waited for the device (the static loop counts them)


def unwrap(model):
    """The Hugging Face model inside the training wrappers (DDP, trainer.Policy)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "vlm"):  # trainer.Policy (not imported: this module is a leaf)
            model = model.vlm
        else:
            return model


# ----------------------------------------------------------------------------------------------------
# choosing a token

def filter_logits(logits, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(logp, generator=None, u=None):
    """One token per row from softmax(logp) (-inf: never), by inverse CDF: a single uniform per row
    against the cumulative probabilities. Seeded, no host sync, and far cheaper on a CPU than drawing an
    exponential per vocabulary entry (the 'race' argmax(p / E)). `u` (rows,): uniforms drawn beforehand
    (the static step's, so that a compiled graph draws exactly what eager draws), else from `generator`."""
    cdf = (logp - logp.max(-1, keepdim=True).values).exp().cumsum(-1)  # unnormalised: scaled by the total
    total = cdf[:, -1:]
    if u is None:
        u = torch.rand(total.shape, generator=generator, device=logp.device, dtype=cdf.dtype)
    u = u.view(-1, 1).to(cdf.dtype) * total
    tok = torch.searchsorted(cdf, u, right=True)  # the first entry whose cumulative mass exceeds u
    # u rounds up to the total once in ~1e7 draws: take the last entry of positive probability then
    return torch.minimum(tok, (cdf < total).sum(-1, keepdim=True))[:, 0]


# ----------------------------------------------------------------------------------------------------
# the KV cache

class KVBuffer:
    """The hand-written decode step's KV cache: for each layer, keys and values of shape
    (rows, kv_heads, max_len, head_dim), preallocated once and written in place, one position per step.
    Prompts are left-padded, so every row has filled the same `length` positions; `valid` (rows, max_len)
    says which of them a row attends to (not its left padding)."""

    def __init__(self, prefill_cache, attention_mask, max_len, group_size=1):
        """Move a prefilled DynamicCache in, each row repeated `group_size` times in a row."""
        rows, length = attention_mask.shape[0] * group_size, attention_mask.shape[1]
        self.keys, self.values = [], []
        for layer in prefill_cache.layers:
            for src, dst in ((layer.keys, self.keys), (layer.values, self.values)):
                buf = src.new_zeros(rows, src.shape[1], max_len, src.shape[3])
                buf[:, :, :length] = src.repeat_interleave(group_size, 0)
                dst.append(buf)
        self.valid = torch.zeros(rows, max_len, dtype=torch.bool, device=attention_mask.device)
        self.valid[:, :length] = attention_mask.bool().repeat_interleave(group_size, 0)
        self.length = length

    def select_rows(self, keep):
        """Keep only the rows `keep` (a LongTensor of row indices)."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.valid = self.valid.index_select(0, keep)


def new_kv_cache(config, kind="static", max_len=None):
    """A transformers KV cache for the prefill (and, for "static"/"dynamic", the decode steps too).
    "static": StaticCache, preallocated for `max_len` positions and written in place; "dynamic":
    DynamicCache, grown by torch.cat at every step (O(T^2) copying). The "buffer" kind prefills into a
    DynamicCache and moves it into a KVBuffer."""
    from transformers import DynamicCache, StaticCache
    if kind == "static":
        return StaticCache(config=config, max_cache_len=max_len)
    if kind in ("dynamic", "buffer"):
        return DynamicCache(config=config)
    raise ValueError(f"unknown cache kind {kind!r} (one of {', '.join(CACHE_KINDS + STATIC_KINDS)})")


def _map_cache_rows(cache, fn, dynamic_method, *args):
    """Apply `fn` to the batch dimension of every layer's keys and values: the G-fold replication and the
    dropping of finished rows. DynamicCache has a method for each; StaticCache has neither, so its
    preallocated (B, heads, max_len, dim) tensors are replaced (cheap next to a decode step)."""
    from transformers import StaticCache
    if not isinstance(cache, StaticCache):
        return getattr(cache, dynamic_method)(*args)
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        layer.batch_size = layer.keys.shape[0]


def repeat_cache_rows(cache, G):
    """Each row of the cache G times in a row (prefill once, sample G)."""
    _map_cache_rows(cache, lambda t: t.repeat_interleave(G, 0), "batch_repeat_interleave", G)


def select_cache_rows(cache, keep):
    """Keep only the rows `keep` (a LongTensor of row indices)."""
    if isinstance(cache, KVBuffer):
        return cache.select_rows(keep)
    _map_cache_rows(cache, lambda t: t.index_select(0, keep), "batch_select_indices", keep)


@functools.cache
def cache_kwarg():
    """The forward argument that takes the KV cache: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    import inspect
    from transformers import Qwen2_5_VLForConditionalGeneration
    params = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ----------------------------------------------------------------------------------------------------
# one decode step

def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_inputs(attn, h, cos, sin, qk_norm):
    """q, k, v (rows, heads, 1, head_dim) of one new position: the projections, Qwen3-VL's per-head q/k
    RMSNorm, and M-RoPE on q and k (as the decoder layer's attention computes them)."""
    rows = h.shape[0]
    q = attn.q_proj(h).view(rows, 1, -1, attn.head_dim)
    k = attn.k_proj(h).view(rows, 1, -1, attn.head_dim)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.v_proj(h).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def decode_step_buffer(model, tokens, position_ids, kv):
    """One token per row through the language model by hand, over a KVBuffer: logits (B, V).

    The same computation as transformers' Qwen2.5-VL / Qwen3-VL decoder layers for one new position
    (pre-norm attention with M-RoPE and grouped KV heads, then the gated MLP), calling the layers' own modules (so
    LoRA and FSDP2's gathered weights are used as they are) but none of their per-call machinery: no mask
    building, no cache objects, no kwargs plumbing. The cache is written in place at one position per
    step, the shape a compiled or CUDA-graph-captured step needs (the one function to replace for that).
    Tested against `decode_step_model`, logits step by step, in tests/test_engine.py."""
    hf = unwrap(model)
    lm = hf.model.language_model
    # Qwen3-VL normalises each head's queries and keys (RMSNorm) before the rotary embedding. Its other
    # differences need nothing here: its rotary_emb already returns the interleaved M-RoPE cos/sin, and
    # DeepStack adds visual features at image positions only, of which a decode step has none.
    qk_norm = hf.config.model_type == "qwen3_vl"
    x = lm.embed_tokens(tokens[:, None])                       # (B, 1, hidden)
    cos, sin = lm.rotary_emb(x, position_ids[..., None])       # M-RoPE: (B, 1, head_dim) each
    cos, sin = cos[:, None], sin[:, None]                      # broadcast over heads
    t = kv.length
    kv.valid[:, t] = True
    mask = kv.valid[:, None, None, :t + 1]                     # (B, 1, 1, t + 1): True = attend
    B = x.shape[0]
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        q, k, v = _attention_inputs(attn, layer.input_layernorm(x), cos, sin, qk_norm)
        kv.keys[i][:, :, t] = k[:, :, 0]
        kv.values[i][:, :, t] = v[:, :, 0]
        # grouped-query attention (each KV head serves a group of query heads) without copying the cache
        o = F.scaled_dot_product_attention(q, kv.keys[i][:, :, :t + 1], kv.values[i][:, :, :t + 1], attn_mask=mask,
                                           scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    kv.length = t + 1
    return hf.lm_head(lm.norm(x)[:, -1])


def decode_step_model(model, tokens, attention_mask, position_ids, cache):
    """One token per row through the model's own forward with a transformers cache: logits (B, V).

    The reference for `decode_step_buffer` (cache_kind "static"/"dynamic"). A decode step has no image,
    so it goes straight to the language model and the LM head, skipping the multimodal wrapper's per-call
    work (image checks, position logic: the positions are given)."""
    hf = unwrap(model)
    hidden = hf.model.language_model(input_ids=tokens[:, None], attention_mask=attention_mask,
                                     position_ids=position_ids[..., None], use_cache=True,
                                     **{cache_kwarg(): cache}).last_hidden_state
    return hf.lm_head(hidden[:, -1])


# ----------------------------------------------------------------------------------------------------
# the static decode step: one shape per bucket, nothing returned to Python (what torch.compile captures)

ROW_MULTIPLE, LENGTH_MULTIPLE, STOP_EVERY = 8, 128, 16


def round_up(n, m):
    return -(-n // m) * m


class StaticKV:
    """The static step's KV cache: `keys`/`values` per layer (rows, kv_heads, length, head_dim) and `valid`
    (rows, length), allocated once per bucket (rows a multiple of 8, length of 128) and reused by every call
    that fits it, so a compiled step sees the same shapes (and, on CUDA, the same addresses) every time.
    Zeros at first: a column no row has written is masked out, but a NaN there would still poison the
    attention (0 · NaN), and stale columns of an earlier call hold finite values."""

    def __init__(self, layers, rows, kv_heads, length, head_dim, dtype, device):
        new = lambda: torch.zeros(rows, kv_heads, length, head_dim, dtype=dtype, device=device)
        self.keys = [new() for _ in range(layers)]
        self.values = [new() for _ in range(layers)]
        self.valid = torch.zeros(rows, length, dtype=torch.bool, device=device)
        if torch.device(device).type == "cuda":  # CUDA graphs replay at fixed addresses: no copies in and out
            for t in self.keys + self.values + [self.valid]:
                torch._dynamo.mark_static_address(t)

    def fill(self, prefill_cache, attention_mask, group_size):
        """Copy a prefilled DynamicCache in, each prompt's row `group_size` times in a row; the rows past
        P·G (padding up to the bucket) repeat row 0. Every column past the prompt is made invalid."""
        n, width = attention_mask.shape[0] * group_size, attention_mask.shape[1]
        rows = torch.arange(self.valid.shape[0], device=attention_mask.device)
        src = torch.where(rows < n, rows, 0) // group_size  # the prompt each row copies
        for layer, k, v in zip(prefill_cache.layers, self.keys, self.values):
            k[:, :, :width] = layer.keys.index_select(0, src)
            v[:, :, :width] = layer.values.index_select(0, src)
        self.valid.zero_()
        self.valid[:, :width] = attention_mask.bool().index_select(0, src)
        return src


_STATIC_KV = weakref.WeakKeyDictionary()  # model -> {bucket: StaticKV}: one allocation per bucket


def static_kv(hf, rows, length, dtype, device):
    """The model's StaticKV for the bucket of (rows, length), allocated on its first use."""
    tc = hf.config.get_text_config()
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    key = (round_up(rows, ROW_MULTIPLE), round_up(length, LENGTH_MULTIPLE), dtype, str(device))
    buckets = _STATIC_KV.setdefault(hf, {})
    if key not in buckets:
        buckets[key] = StaticKV(tc.num_hidden_layers, key[0], tc.num_key_value_heads, key[1], head_dim, dtype,
                                device)
    return buckets[key]


def static_logits(hf, tokens, pos0, col, keys, values, valid):
    """`decode_step_buffer` over a StaticKV, at fixed shapes: logits (R, V) of `tokens` (R,) written at
    column `col` (a (1,) long tensor), at M-RoPE position `pos0 + col` ((3, R): a text token has equal
    t/h/w, so left padding and the image fold into a per-row constant, HF's rope_deltas). Attends over the
    whole buffer under `valid`; grouped queries are packed (R, kv_heads, group, D) against the cache, so
    no query head gets its own copy of K/V and any masked SDPA kernel applies."""
    lm = hf.model.language_model
    qk_norm = hf.config.model_type == "qwen3_vl"  # per-head q/k RMSNorm (see decode_step_buffer)
    R = tokens.shape[0]
    x = lm.embed_tokens(tokens[:, None])                              # (R, 1, hidden)
    cos, sin = lm.rotary_emb(x, (pos0 + col)[..., None])              # (R, 1, head_dim) each
    cos, sin = cos[:, None], sin[:, None]
    valid.index_fill_(1, col, True)
    mask = valid[:, None, None, :]                                    # (R, 1, 1, M): True = attend
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        q, k, v = _attention_inputs(attn, layer.input_layernorm(x), cos, sin, qk_norm)  # (R, heads, 1, D)
        keys[i].index_copy_(2, col, k)
        values[i].index_copy_(2, col, v)
        # SDPA over the packed queries (on this CPU 15% faster compiled than the attention written out)
        o = F.scaled_dot_product_attention(q.reshape(R, keys[i].shape[1], -1, attn.head_dim), keys[i],
                                           values[i], attn_mask=mask, scale=attn.scaling)  # (R, kv, group, D)
        x = x + attn.o_proj(o.reshape(R, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return hf.lm_head(lm.norm(x)[:, -1])


def choose(logits, u, done, eos, banned, *, greedy, temperature, top_k, top_p, pad_token_id):
    """The sampler of `sample_completions` without host syncs: (token, its log-prob under softmax(logits/T),
    done after it) per row; a finished row emits pad with log-prob 0. `u` (R,): this step's uniforms."""
    scaled = logits.float()
    if not greedy and temperature != 1.0:
        scaled = scaled / temperature
    logp_all = scaled.log_softmax(-1)
    pick = logp_all.index_fill(-1, banned, float("-inf")) if len(banned) else logp_all
    tok = pick.argmax(-1) if greedy else draw(filter_logits(pick, top_k, top_p), u=u)
    tok = tok.masked_fill(done, pad_token_id)
    logp = logp_all.gather(-1, tok[:, None])[:, 0].masked_fill(done, 0.0)
    return tok, logp, done | torch.isin(tok, eos)


def decode_step_static(hf, tokens, pos0, col, keys, values, valid, u, done, eos, banned, **sampling):
    """One static decode step: the logits of `tokens` (`static_logits`), then the next token (`choose`).
    Every shape is fixed by the bucket and nothing goes back to Python, so it compiles to one graph."""
    logits = static_logits(hf, tokens, pos0, col, keys, values, valid)
    return choose(logits, u, done, eos, banned, **sampling)


@functools.cache
def compiled_step(cuda_graphs):
    """`decode_step_static` under torch.compile (one graph per bucket and sampling config; prefill stays
    eager), replayed as a CUDA graph when `cuda_graphs`."""
    mode = "reduce-overhead" if cuda_graphs else None
    return torch.compile(decode_step_static, fullgraph=True, dynamic=False, mode=mode)


def graphs_fit(model, device):
    """Whether the compiled step may replay CUDA graphs: on CUDA, unless the model is sharded by FSDP2. A
    graph reads the weights at the addresses it recorded; FSDP2 frees the gathered weights after each
    rollout and gathers them at new addresses for the next (measured on 2 gloo ranks: every optimizer
    step). torch would re-record for the moved weights, keeping every earlier recording; there the step
    compiles without graphs instead (fused kernels, one launch each). Dynamo itself does not recompile for
    the moved weights (tests/test_grpo.py, fsdp_compiled)."""
    from torch.distributed.fsdp import FSDPModule
    return device.type == "cuda" and not any(isinstance(m, FSDPModule) for m in model.modules())


def row_uniforms(seeds, group_size, rows, steps):
    """(steps, rows) uniforms, one stream per row: row p·G + g draws from a generator seeded by (seeds[p],
    g), so a row's samples do not depend on the rows that share its batch. Rows past P·G get zeros."""
    u = torch.zeros(steps, rows)
    for p, seed in enumerate(seeds):
        for g in range(group_size):
            # a tuple of ints hashes the same in every process (only str hashing is salted)
            gen = torch.Generator().manual_seed(hash((int(seed), g)) & (2 ** 63 - 1))
            u[:, p * group_size + g] = torch.rand(steps, generator=gen)
    return u


def prompt_seeds(prompts, seeds=None, generator=None):
    """A seed per prompt: `seeds` (ints, or generators to draw one from) when given, else drawn from
    `generator` (or torch's global generator)."""
    def randoms(n, gen):  # on the generator's device (a CUDA generator draws only there)
        return torch.randint(2 ** 62, (n,), generator=gen, device=gen.device if gen else "cpu").tolist()

    if seeds is None:
        return randoms(prompts, generator)
    if len(seeds) != prompts:
        raise ValueError(f"{len(seeds)} seeds for {prompts} prompts")
    return [randoms(1, s)[0] if isinstance(s, torch.Generator) else int(s) for s in seeds]


def _decode_static(hf, kv, logits, src, pos0, width, u, G, P, max_new_tokens, step, *, eos_token_ids,
                   pad_token_id, banned_token_ids, **sampling):
    """The loop around the static step: the whole bucket decodes every step (finished rows emit pad), and
    the end is checked every STOP_EVERY tokens, so a rollout of L tokens syncs with the host at most
    ceil(L / STOP_EVERY) times."""
    device = logits.device
    R, N = kv.valid.shape[0], P * G
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device)
    banned = torch.tensor(sorted(banned_token_ids), dtype=torch.long, device=device)
    col = torch.full((1,), width, dtype=torch.long, device=device)
    done = torch.arange(R, device=device) >= N  # the bucket's padding rows are finished from the start
    kw = dict(pad_token_id=pad_token_id, **sampling)
    tokens_out = torch.full((R, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logp_out = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=device)
    mask_out = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=device)
    tok, logp, after = choose(logits.index_select(0, src), u[0], done, eos, banned, **kw)
    syncs = 0
    for t in range(max_new_tokens):
        tokens_out[:, t], logp_out[:, t], mask_out[:, t] = tok, logp, (~done).float()
        done = after
        if t == max_new_tokens - 1:
            break
        if (t + 1) % STOP_EVERY == 0:
            syncs += 1
            if not bool((~done).any()):  # the only host sync inside the loop
                break
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed above
        tok, logp, after = step(hf, tok, pos0, col, kv.keys, kv.values, kv.valid, u[t + 1], done, eos, banned,
                                **kw)
        if device.type == "cuda":  # a CUDA graph's next replay overwrites its outputs (gpt-fast clones too)
            tok, logp, after = tok.clone(), logp.clone(), after.clone()
        col += 1
    steps = int(mask_out.sum(1).max())  # the longest row: where the eager loop would have stopped
    return Completions(tokens_out[:N, :steps], mask_out[:N, :steps], logp_out[:N, :steps], syncs + 1)


# ----------------------------------------------------------------------------------------------------
# the loop

def check_context(model, max_new_tokens, prompt_tokens=0):
    """Refuse a completion length the model cannot hold: prompt + new tokens beyond its context."""
    context = getattr(unwrap(model).config.get_text_config(), "max_position_embeddings", None)
    if context and prompt_tokens + max_new_tokens > context:
        raise ValueError(f"--max_new_tokens {max_new_tokens}: a prompt of {prompt_tokens} tokens and as many new "
                         f"ones exceed the model's context of {context} tokens (max_position_embeddings)")


@torch.no_grad()
def sample_completions(model, batch, *, group_size=1, max_new_tokens=256, temperature=1.0, top_p=1.0,
                       top_k=0, greedy=False, generator=None, eos_token_ids=(), pad_token_id=0,
                       banned_token_ids=(), compact_at=0.5, cache_kind="buffer", seeds=None):
    """Sample `group_size` completions per prompt of `batch` (a vlm.PromptBatch on the model's device).

    Rows that emit an EOS stop; when the live rows fall to `compact_at` of the rows being decoded,
    finished rows are dropped from the cache so they stop costing compute. Returned log-probs are those
    of the *untruncated* softmax(logits / T): top-k/top-p and `banned_token_ids` (vlm.Processor's vision
    tokens) only decide what is sampled, so the log-probs equal `trainer.sequence_logprobs` of the same tokens
    and the GRPO ratio is exactly 1 at the first update. `cache_kind`: "buffer" (a KVBuffer and
    `decode_step_buffer`), or the model's own forward over transformers' "static" or "dynamic" cache.
    "static_eager"/"compiled": `decode_step_static` over a StaticKV bucket, eager or compiled; all rows
    decode to the end (no compaction: `compact_at` is ignored), the end is checked every STOP_EVERY tokens,
    and each row draws from its own stream, seeded by `seeds` (one int or generator per prompt; default:
    drawn from `generator`). Under FSDP2 call it inside `trainer.generation_mode`, where every shard is
    gathered once for the loop.
    """
    G, P = group_size, len(batch)
    device = batch.input_ids.device
    check_context(model, max_new_tokens, batch.input_ids.shape[1])  # before a cache of that length is allocated
    max_len = batch.input_ids.shape[1] + max_new_tokens
    layer_types = getattr(unwrap(model).config.text_config, "layer_types", ())
    if cache_kind in ("buffer", *STATIC_KINDS) and "sliding_attention" in layer_types:
        cache_kind = "static"  # the hand-written step has no sliding-window attention
    static = cache_kind in STATIC_KINDS
    cache = new_kv_cache(model.config, "dynamic" if static else cache_kind, max_len=max_len)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                mm_token_type_ids=batch.mm_token_type_ids, use_cache=True, logits_to_keep=1,
                **{cache_kwarg(): cache})
    logits = out.logits[:, -1]
    mask, positions = batch.attention_mask, batch.next_positions()
    if static:
        hf, width = unwrap(model), batch.input_ids.shape[1]
        kv = static_kv(hf, P * G, max_len, cache.layers[0].keys.dtype, device)
        src = kv.fill(cache, mask, G)
        del cache
        seeds = prompt_seeds(P, seeds, generator)
        u = row_uniforms(seeds, G, len(src), max_new_tokens).to(device)
        step = compiled_step(graphs_fit(model, device)) if cache_kind == "compiled" else decode_step_static
        return _decode_static(hf, kv, logits, src, positions.index_select(1, src) - width, width, u, G, P,
                              max_new_tokens, step, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                              banned_token_ids=banned_token_ids, greedy=greedy, temperature=temperature,
                              top_k=top_k, top_p=top_p)
    if cache_kind == "buffer":  # the G samples of a prompt share its prefill
        cache = KVBuffer(cache, mask, max_len, G)
    elif G > 1:
        repeat_cache_rows(cache, G)
    if G > 1:
        logits, mask = logits.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
        positions = positions.repeat_interleave(G, 1)
    N = P * G
    banned = torch.tensor(sorted(banned_token_ids), dtype=torch.long, device=device)
    tokens_out = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logp_out = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    mask_out = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device)
    rows = torch.arange(N, device=device)          # which output row each decoded row writes to
    done = torch.zeros(N, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        scaled = logits.float()
        if not greedy and temperature != 1.0:
            scaled = scaled / temperature
        logp_all = scaled.log_softmax(-1)
        # what may be sampled: log-probs differ from the logits by a constant per row, so they keep
        # the same order, the same top-k and (renormalised) the same top-p set
        pick = logp_all.index_fill(-1, banned, float("-inf")) if len(banned) else logp_all
        if greedy:
            tok = pick.argmax(-1)
        else:
            tok = draw(filter_logits(pick, top_k, top_p), generator)
        tok = tok.masked_fill(done, pad_token_id)
        live = (~done).float()
        tokens_out[rows, t] = tok
        logp_out[rows, t] = logp_all.gather(-1, tok[:, None])[:, 0] * live
        mask_out[rows, t] = live
        done = done | torch.isin(tok, eos)
        steps = t + 1
        n_live = int((~done).sum())  # host sync once per token; cheap next to the forward
        if n_live == 0 or t == max_new_tokens - 1:
            break
        if n_live <= compact_at * len(rows):  # drop finished rows from the batch and the cache
            keep = (~done).nonzero()[:, 0]
            select_cache_rows(cache, keep)
            rows, tok, done, mask, positions = rows[keep], tok[keep], done[keep], mask[keep], positions[:, keep]
        if cache_kind == "buffer":
            logits = decode_step_buffer(model, tok, positions, cache)
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = decode_step_model(model, tok, mask, positions, cache)
        positions = positions + 1
    return Completions(tokens_out[:, :steps], mask_out[:, :steps], logp_out[:, :steps])


def text_generator(model, processor, max_new_tokens=16, batch_size=32):
    """A `generate_fn(list[str]) -> list[str]`: greedy text-only answers (the LLM verifier of reward.py);
    `processor` is a vlm.Processor."""
    device = next(model.parameters()).device

    def generate(prompts):
        out = []
        for s in range(0, len(prompts), batch_size):
            batch = processor.encode(None, prompts[s:s + batch_size]).to(device)
            done = sample_completions(model, batch, max_new_tokens=max_new_tokens, greedy=True,
                                      **processor.sampling_tokens)
            out += processor.decode(done.completion_ids, done.completion_mask)
        return out
    return generate


def generate_reference(model, batch, max_new_tokens, pad_token_id):
    """transformers' own greedy `model.generate` on the same batch: new tokens (P, L)."""
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=batch.mm_token_type_ids, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
    return out[:, batch.input_ids.shape[1]:]


def parse_args(argv=None):
    from common import add_runtime_args
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    ap.add_argument("--max_new_tokens", type=int, default=24, help="tokens decoded per prompt")
    add_runtime_args(ap)
    return ap.parse_args(argv)


def main(argv=None):
    """Greedy decoding of a few prompts (different image sizes, left-padded) by every cache kind and by
    `model.generate`: token for token equal, with their times."""
    import numpy as np
    from PIL import Image

    import vlm
    from common import resolve_device
    args = parse_args(argv)
    device = resolve_device(args.device)
    model, proc = vlm.load_model(args.model, device, args.dtype), vlm.Processor.from_pretrained(args.model)
    rng = np.random.default_rng(args.seed)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(56, 56), (84, 56), (56, 112)]]
    batch = proc.encode(images, ["Hi", "What is the name of the shape?", "Name it, then explain why."]).to(device)
    t0 = time.perf_counter()
    ref = generate_reference(model, batch, args.max_new_tokens, proc.pad_token_id)
    print(f"model.generate          {time.perf_counter() - t0:.3f}s")
    all_equal = True
    for kind in CACHE_KINDS + STATIC_KINDS:
        t0 = time.perf_counter()
        ours = sample_completions(model, batch, max_new_tokens=args.max_new_tokens, greedy=True, cache_kind=kind,
                                  eos_token_ids=proc.eos_token_ids, pad_token_id=proc.pad_token_id)
        seconds = time.perf_counter() - t0
        lengths = ours.completion_mask.sum(1).long().tolist()
        same = all(ours.completion_ids[i, :n].tolist() == ref[i, :n].tolist() for i, n in enumerate(lengths))
        all_equal &= same
        print(f"ours, {kind:8s} cache   {seconds:.3f}s   token-for-token equal to generate: {same}")
    raise SystemExit(0 if all_equal else 1)


if __name__ == "__main__":
    main()
