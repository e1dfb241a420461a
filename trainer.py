"""trainer.py — the model as training sees it: score given completions, and set a run up.

- `sequence_logprobs`: per-token log-probs of given completions in one forward over prompt ⊕ completion;
  each prompt that several completions continue (a GRPO group) is encoded once for all of them
  (`shared_prefix_layout`), the per-completion forward being the reference it is tested against. The
  vocabulary projection runs in checkpointed chunks (the real vocabulary is 151k+). `Policy` is the module
  that training calls and data-parallel wrappers wrap; `score_completions` scores without gradient.
- `setup_training`: what sft.py and grpo.py share: load → choose what trains → DDP / FSDP2 → optimizer and
  schedule → resume; `autocast` and `generation_mode` (sampling from a sharded policy).
Used by the training stages and bench.py; loading and prompts are vlm.py's, sampling engine.py's.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import lora
from common import (Dist, all_reduce_sum, barrier, fraction, nonnegative_float, nonnegative_int,
                    positive_float, print0, resolve_dtype)
from vlm import Processor, PromptBatch, load_model

# ----------------------------------------------------------------------------------------------------
# scoring: per-token log-probs of given completions

def _token_logprobs(hidden, weight, targets, temperature, want_entropy, entropy_grad=False):
    logits = F.linear(hidden, weight).float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    if not want_entropy:
        return logp, torch.zeros_like(logp)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    # detached unless a loss term needs it: its backward keeps one more chunk of probabilities
    return logp, entropy if entropy_grad else entropy.detach()


def completion_lengths(mask):
    """Per row, the columns up to its last masked-in token (0 for an empty row): the part of a
    right-padded completion a forward needs."""
    columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (columns * (mask > 0)).amax(1)


@dataclass
class SharedPrefixLayout:
    """Completions packed behind their prompts: one row per distinct prompt, holding the prompt (left-
    padded as in the PromptBatch) and then each of its completions one after another. `attend` lets a
    prompt token see the prompt causally, and a completion token see its prompt and, causally, its own
    completion, never another completion of the row. `gather` (rows, cols) picks, for each completion
    position t, the packed position whose hidden state predicts token t (the prompt's last token for
    t = 0, else the completion's own token t - 1)."""
    input_ids: torch.Tensor          # (R, S)
    position_ids: torch.Tensor       # (3, R, S)
    mm_token_type_ids: torch.Tensor  # (R, S)
    attend: torch.Tensor             # (R, 1, S, S) bool, True = may attend
    gather_rows: torch.Tensor        # (N, 1)
    gather_cols: torch.Tensor        # (N, L)
    prompts: PromptBatch             # the R distinct prompt rows (their pixels feed the vision tower)


def shared_prefix_layout(batch, prompt_rows, completion_ids, completion_mask):
    """Pack completion i behind prompt row `prompt_rows[i]` of `batch` (see SharedPrefixLayout).

    Positions continue each prompt's M-RoPE positions, restarting after the prompt for every completion,
    so completion i sees exactly the positions, keys and values it sees in a forward of its own."""
    distinct = list(dict.fromkeys(prompt_rows))          # prompt rows in order of first use
    slot = {row: r for r, row in enumerate(distinct)}
    prompts = batch.select(distinct)
    R, Tp = prompts.input_ids.shape
    N, L = completion_ids.shape
    device = completion_ids.device
    lengths = completion_lengths(completion_mask).tolist()
    starts, ends = [], [Tp] * R
    for i, row in enumerate(prompt_rows):
        r = slot[row]
        starts.append(ends[r])
        ends[r] += lengths[i]
    S = max(ends)
    input_ids = torch.zeros(R, S, dtype=torch.long, device=device)
    position_ids = torch.zeros(3, R, S, dtype=torch.long, device=device)
    key_ok = torch.zeros(R, S, dtype=torch.bool, device=device)
    segment = torch.full((R, S), -2, dtype=torch.long, device=device)  # -1 prompt, i completion i, -2 padding
    input_ids[:, :Tp], position_ids[:, :, :Tp] = prompts.input_ids, prompts.position_ids
    key_ok[:, :Tp], segment[:, :Tp] = prompts.attention_mask.bool(), -1
    first = prompts.next_positions()                      # (3, R)
    gather_cols = torch.full((N, L), Tp - 1, dtype=torch.long, device=device)
    for i, row in enumerate(prompt_rows):
        r, s, n = slot[row], starts[i], lengths[i]
        input_ids[r, s:s + n] = completion_ids[i, :n]
        position_ids[:, r, s:s + n] = first[:, r, None] + torch.arange(n, device=device)
        key_ok[r, s:s + n] = completion_mask[i, :n] > 0
        segment[r, s:s + n] = i
        gather_cols[i, 1:n] = torch.arange(s, s + n - 1, device=device)
    q, k = torch.arange(S, device=device)[:, None], torch.arange(S, device=device)[None, :]
    same = (segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None])  # (R, S_q, S_k)
    attend = (k <= q) & same & key_ok[:, None, :] & (segment != -2)[:, :, None]
    # a padding position attends to itself: no query row is fully masked (softmax over nothing is NaN,
    # and NaN values would leak through the zero weights of the rows that do read them)
    attend |= torch.eye(S, dtype=torch.bool, device=device) & ~attend.any(-1, keepdim=True)
    mm = torch.zeros(R, S, dtype=torch.long, device=device)
    mm[:, :Tp] = prompts.mm_token_type_ids
    rows = torch.tensor([slot[row] for row in prompt_rows], dtype=torch.long, device=device)[:, None]
    return SharedPrefixLayout(input_ids, position_ids, mm, attend[:, None], rows, gather_cols, prompts)


def _mask_for(model, attend, dtype):
    """The 4-D mask in the form the model's attention takes: boolean for sdpa, additive for eager."""
    kind = model.config._attn_implementation
    if kind == "sdpa":
        return attend
    if kind == "eager":
        blocked = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
        return blocked.masked_fill(~attend, torch.finfo(dtype).min)
    raise ValueError(f"the shared-prefix forward needs sdpa or eager attention, not {kind!r} "
                     f"(or score one row per completion: --prefix_forward per_row)")


def completion_hidden_states(model, batch, completion_ids, completion_mask, prompt_rows=None,
                             shared_prefix=True):
    """(N, L, hidden): the last layer's state before each completion token (the one that predicts it).

    Per row (the reference): prompt ⊕ completion for each completion, the prompt repeated as often as it
    has completions. Shared prefix: each distinct prompt once, its completions packed behind it
    (`shared_prefix_layout`), so the vision tower and the prompt's layers run once per prompt row; each
    completion attends to its prompt's keys and values as it would in its own row, so the states, and
    the gradients that flow back into the prompt (summed over its completions), are the same."""
    N, L = completion_ids.shape
    given_rows = prompt_rows
    prompt_rows = list(range(N)) if prompt_rows is None else list(prompt_rows)
    if not shared_prefix or len(set(prompt_rows)) == N:  # per row (or nothing to share)
        rows = batch if given_rows is None else batch.select(prompt_rows)
        Tp = rows.input_ids.shape[1]
        cmask = completion_mask.to(rows.attention_mask.dtype)
        completion_pos = rows.next_positions()[..., None] + torch.arange(L, device=completion_ids.device)
        return model.model(
            input_ids=torch.cat([rows.input_ids, completion_ids], 1),
            attention_mask=torch.cat([rows.attention_mask, cmask], 1),
            position_ids=torch.cat([rows.position_ids, completion_pos], 2),
            # without mm_token_type_ids transformers silently falls back to 1-D positions inside the model
            mm_token_type_ids=torch.cat([rows.mm_token_type_ids, torch.zeros_like(completion_ids)], 1),
            pixel_values=rows.pixel_values, image_grid_thw=rows.image_grid_thw, use_cache=False,
        ).last_hidden_state[:, Tp - 1:Tp - 1 + L]  # the state before token t predicts token t
    pack = shared_prefix_layout(batch, prompt_rows, completion_ids, completion_mask)
    hidden = model.model(
        input_ids=pack.input_ids, attention_mask=_mask_for(model, pack.attend, model.lm_head.weight.dtype),
        position_ids=pack.position_ids, mm_token_type_ids=pack.mm_token_type_ids,
        pixel_values=pack.prompts.pixel_values, image_grid_thw=pack.prompts.image_grid_thw, use_cache=False,
    ).last_hidden_state
    return hidden[pack.gather_rows, pack.gather_cols]


def sequence_logprobs(model, batch, completion_ids, completion_mask, *, prompt_rows=None, temperature=1.0,
                      chunk_size=1024, return_entropy=False, shared_prefix=True, entropy_grad=False):
    """log softmax(logits / T)[o_t] of each completion token, from one forward over prompts and completions.

    Completion i continues prompt row `prompt_rows[i]` of `batch` (default: row i). With `shared_prefix`
    a prompt that several completions continue (a GRPO group) is encoded once for all of them; without,
    once per completion, the reference it is tested against (`completion_hidden_states`). The vocabulary
    projection runs over chunks of `chunk_size` positions, each under activation checkpointing when
    gradients are on, so only one chunk of (rows × chunk × vocab) fp32 logits exists at a time, in the
    forward and in the backward. Returns (N, L) log-probs [and entropies: with `entropy_grad`, with their
    gradient (an entropy bonus), else detached].
    """
    L = completion_ids.shape[1]
    hidden = completion_hidden_states(model, batch, completion_ids, completion_mask, prompt_rows,
                                      shared_prefix)
    weight = model.lm_head.weight
    logps, entropies = [], []
    for s in range(0, L, chunk_size):
        args = (hidden[:, s:s + chunk_size], weight, completion_ids[:, s:s + chunk_size], temperature,
                return_entropy, entropy_grad)
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(_token_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _token_logprobs(*args)
        logps.append(lp)
        entropies.append(ent)
    logp = torch.cat(logps, 1) * completion_mask
    if return_entropy:
        return logp, torch.cat(entropies, 1) * completion_mask
    return logp


class Policy(nn.Module):
    """The model as training sees it, and the module that DDP / FSDP2 wrap.

    `policy(batch, completion_ids, completion_mask, prompt_rows=...)` = `sequence_logprobs`; any other call
    (the sampler's prefill and decode steps) goes to the Hugging Face model. Both pass through this module's
    forward, so data-parallel wrappers see every call (FSDP2 gathers its root parameters there)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    @property
    def config(self):
        return self.vlm.config

    def forward(self, batch=None, completion_ids=None, completion_mask=None, prompt_rows=None,
                temperature=1.0,
                return_entropy=False, shared_prefix=True, entropy_grad=False, **lm_kwargs):
        if batch is None:
            return self.vlm(**lm_kwargs)
        return sequence_logprobs(self.vlm, batch, completion_ids, completion_mask, prompt_rows=prompt_rows,
                                 temperature=temperature, return_entropy=return_entropy,
                                 shared_prefix=shared_prefix,
                                 entropy_grad=entropy_grad)


def used_columns(mask):
    """Number of leading columns holding some completion token (the rest is right padding)."""
    return int(mask.sum(0).nonzero().max()) + 1 if mask.sum() > 0 else 1


@torch.no_grad()
def score_completions(policy, prompts, prompt_rows, ids, mask, *, micro_batch_size, temperature=1.0,
                      shared_prefix=True, bf16=False):
    """Log-probs of completions without gradient, in eval mode (no dropout), `micro_batch_size` rows per
    forward; completion i is scored under prompt row `prompt_rows[i]` of `prompts`."""
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    was_training = policy.training
    policy.eval()
    for s in range(0, len(prompt_rows), micro_batch_size):
        idx = list(range(s, min(s + micro_batch_size, len(prompt_rows))))
        keep = used_columns(mask[idx])
        with autocast(ids.device, bf16):
            rows = [prompt_rows[i] for i in idx]
            out[idx, :keep] = policy(prompts, ids[idx, :keep], mask[idx, :keep], rows,
                                     temperature=temperature, shared_prefix=shared_prefix)
    policy.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------
# training set-up, shared by sft.py and grpo.py

def configure_trainable(model, *, lora_r=0, lora_alpha=32, lora_dropout=0.05, train_vision=False,
                        gradient_checkpointing=False):
    """Choose what trains and keep it in fp32 (master weights; bf16 compute comes from autocast).

    LoRA (lora_r > 0): adapters on the language model (and on the vision tower with train_vision), all
    base weights frozen. Full fine-tuning: everything trains except the vision tower and its merger
    (the projector) unless train_vision. Returns the trainable parameters."""
    if lora_r > 0:
        lora.add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, include_vision=train_vision)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(train_vision or ".visual." not in f".{name}.")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return params


def autocast(device, bf16):
    """bf16 autocast on CUDA (fp32 master weights, bf16 matmuls); a no-op on CPU or in fp32."""
    if bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_policy(model, d, *, fsdp=False, bf16=False):
    """(trainable, inner): `trainable` is what the loss calls (DDP / FSDP2 / the Policy itself); `inner` is
    the Policy, for sampling and saving. FSDP2 shards each decoder layer and vision block, then the root."""
    policy = Policy(model)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
        for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
            fully_shard(block, mp_policy=mp)
        fully_shard(policy, mp_policy=mp)
        return policy, policy
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(policy, device_ids=[d.local_rank] if d.device.type == "cuda" else None), policy
    return policy, policy


@contextlib.contextmanager
def generation_mode(policy):
    """Eval mode for sampling; under FSDP2 every shard is gathered once for the whole decode loop instead
    of at every token (the full model must fit one GPU for this, as it does for 3B/7B in bf16)."""
    from torch.distributed.fsdp import FSDPModule
    sharded = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    was_training = policy.training
    policy.eval()
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
        policy.train(was_training)


def make_optimizer(params, lr, weight_decay=0.0, betas=(0.9, 0.999)):
    """AdamW; weight decay on matrices only (not on biases and norms)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_schedule(optimizer, kind, warmup_steps, total_steps):
    """Linear warmup, then constant or cosine decay to zero at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(params, max_norm):
    """Clip to max_norm and return the total norm (a float; inf/nan when some gradient is not finite)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(norm)


@dataclass
class Training:
    """What sft.py and grpo.py train, as `setup_training` leaves it."""
    policy: Policy             # sampled from, scored, saved
    trainable: nn.Module       # what the loss calls: the policy wrapped by DDP / FSDP2, or the policy itself
    processor: Processor
    params: list               # the trainable parameters (FSDP2: their shards)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    bf16: bool
    reference: Policy | None = None  # full fine-tuning with a KL term: a frozen copy of the start
    start_step: int = 0
    resumed: dict = field(default_factory=dict)  # the `extra` saved with the checkpoint resumed from
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    skipped_in_a_row: int = 0   # updates skipped for a non-finite gradient since the last good one

    def optimizer_step(self):
        """Clip, step (unless a gradient is not finite: then nothing reaches the weights), zero the
        gradients, advance the schedule (always, so a resumed run stays step-exact). Returns the norm.

        A run stops, before anything is saved, when MAX_SKIPPED updates in a row had a non-finite gradient
        or when an update leaves a weight non-finite (an optimizer step with an infinite or huge rate)."""
        grad_norm = clip_gradients(self.params, self.max_grad_norm)
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.skipped_in_a_row = 0
            local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]  # FSDP2: this shard
            bad = sum(float(not torch.isfinite(p).all()) for p in local)
            if all_reduce_sum([bad], local[0].device)[0]:  # every rank stops together
                raise NonFiniteError(f"an update made the weights non-finite (learning rate "
                                     f"{self.scheduler.get_last_lr()[0]:g}): stopping; they are not saved")
        else:
            self.skipped_in_a_row += 1
            print(f"warning: non-finite gradient norm ({grad_norm}); update skipped", flush=True)
            if self.skipped_in_a_row >= MAX_SKIPPED:
                raise NonFiniteError(f"{MAX_SKIPPED} updates in a row had a non-finite loss or gradient: "
                                     "stopping (the weights are the last good update's; none is saved)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm


MAX_SKIPPED = 3  # one non-finite gradient is skipped (a rare overflow); a run of them is a broken run


class NonFiniteError(SystemExit):
    """The run produced a non-finite loss, gradient or weight; raised before anything is saved."""


def add_training_args(ap, *, lr, schedule, warmup_ratio):
    """The flags `setup_training` reads (and the run's length), with the stage's own schedule defaults."""
    a = ap.add_argument
    a("--max_steps", type=nonnegative_int, default=0, help="training steps (0: from --epochs)")
    a("--epochs", type=positive_float, default=1.0, help="passes over the data (ignored with --max_steps)")
    a("--lr", type=positive_float, default=lr, help="peak learning rate (AdamW)")
    a("--schedule", default=schedule, choices=["constant", "cosine"], help="after the warmup")
    a("--warmup_ratio", type=fraction, default=warmup_ratio, help="share of the updates with linear warmup")
    a("--weight_decay", type=nonnegative_float, default=0.0, help="AdamW weight decay on matrices")
    a("--grad_clip", type=nonnegative_float, default=1.0, help="max gradient norm (0: no clipping)")
    a("--lora_r", type=nonnegative_int, default=0, help="LoRA rank (0: full fine-tuning)")
    a("--lora_alpha", type=positive_float, default=32, help="LoRA scale alpha / r")
    a("--lora_dropout", type=fraction, default=0.05, help="dropout on the adapters' input")
    a("--train_vision", action="store_true", help="also train the vision tower and merger (else frozen)")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    a("--fsdp", action="store_true", help="shard with FSDP2 under torchrun (full fine-tuning of 7B), not DDP")
    a("--save_every", type=nonnegative_int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep", type=nonnegative_int, default=2, help="step checkpoints kept on disk")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def setup_training(args, d, total_updates, reference=False, defaults=None):
    """load → choose what trains → wrap for data parallelism → optimizer and schedule → resume.

    With --resume the newest complete checkpoint in --out is continued: full fine-tuning takes its
    weights, LoRA puts its adapter back on the starting model; optimizer, schedule and RNG are restored.
    `reference`: also load the KL term's reference policy (the starting weights, frozen) for full
    fine-tuning; with LoRA the reference is the policy itself with its adapters switched off. `defaults`:
    the flags' defaults, so that a checkpoint older than a flag resumes at that flag's default."""
    if d.is_main:
        for line in checkpoint.clean_partial(args.out):
            print(line, flush=True)
    barrier()
    resume_from = checkpoint.latest_checkpoint(args.out) if args.resume else None
    if resume_from:
        checkpoint.check_resume_args(resume_from, args, defaults)
    elif args.resume:
        print0(f"--resume: no checkpoint in {args.out} yet, starting from step 0")
    bf16 = resolve_dtype(args.dtype, d.device) == torch.bfloat16
    # FSDP2 shards fp32 weights loaded on the CPU; everything else loads on its device in its dtype
    where, dtype = ("cpu", "fp32") if args.fsdp else (d.device, args.dtype)
    model = load_model(resume_from if resume_from and not args.lora_r else args.model, where, dtype)
    processor = Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    configure_trainable(model, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        train_vision=args.train_vision, gradient_checkpointing=args.gradient_checkpointing)
    if resume_from and args.lora_r:
        lora.load_lora_weights(model, resume_from)
    trainable, policy = wrap_policy(model.to(d.device), d, fsdp=args.fsdp, bf16=bf16)
    ref = None
    if reference and not args.lora_r:  # sharded like the policy under FSDP2, a plain copy otherwise
        ref_model = load_model(args.model, where, dtype).requires_grad_(False)
        # sharded like the policy under FSDP2; no DDP otherwise: it has no gradients to average
        _, ref = wrap_policy(ref_model.to(d.device), d if args.fsdp else Dist(device=d.device),
                             fsdp=args.fsdp, bf16=bf16)
        ref.eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    scheduler = lr_schedule(optimizer, args.schedule, int(args.warmup_ratio * total_updates), total_updates)
    training = Training(policy, trainable, processor, params, optimizer, scheduler, bf16, ref,
                        max_grad_norm=args.grad_clip)
    if resume_from:
        training.start_step, training.resumed = checkpoint.load_training_state(resume_from, training,
                                                                                args.fsdp)
        print0(f"resumed from {resume_from} at step {training.start_step}")
    return training
