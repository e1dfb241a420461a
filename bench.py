"""bench.py — how fast are rollouts and updates? Measured in one run, printed as one table.

- rollout: generated tokens/s of engine.sample_completions (prefill once, G samples per prompt, the
  hand-written decode step over a preallocated KV buffer; also its reference paths, the model's own
  forward over StaticCache and over DynamicCache) against `model.generate` producing the same samples
  (same model, prompts, images, G, new tokens; EOS disabled so every row has the same length), and
  their ratio;
- decode step vs the memory-bandwidth limit: bytes a decode step must read (language-model weights +
  the KV cache at the mean context) / the step's time, as a share of the bandwidth measured on this device;
- update: one scorer forward + backward over the completions, each group's prompt encoded once (the
  shared prefix grpo.py uses) against once per completion (per row): time, FLOPs counted by torch, MFU
  (FLOPs / time / peak FLOP/s; on a CPU the peak is a measured matmul rate), the activations one
  micro-batch holds for its backward, and the ratios;
- peak memory of each; with a real shape, the projected hours of each paper recipe (runs/) on this device.

    python bench.py                                   # tiny model on CPU, GRPO shape 8 prompts x 8 x 64
    python bench.py --threads 1                       # the same on one CPU thread
    python bench.py --threads 1 --prompt listed --max_new_tokens 20 --micro_batch_size 8   # the toy's Visual-RFT update
    python bench.py --shape 7b --text_layers 2 --vision_depth 2 --max_pixels 200704 --prompt_tokens 100 \
        --prompts_per_call 1 --num_samples 8 --max_new_tokens 128 --micro_batch_size 8 --update_only --repeats 1 \
        --dtype bf16                                  # 7B widths, two layers per tower: the update on a CPU
    python bench.py --shape 7b --dtype bf16 --prompts_per_call 32 --num_samples 8 --max_new_tokens 256 --max_pixels 200704
    python bench.py --shape qwen3-8b --dtype bf16 --prompts_per_call 32 --num_samples 8 --max_new_tokens 256 \
        --max_pixels 262144                              # the same 256 visual tokens an image as 448 px for Qwen2.5-VL
    python bench.py --shape 7b --dtype bf16 --prompts_per_call 1 --num_samples 8 --max_new_tokens 1024 --max_pixels 200704 \
        --lora_r 64 --gradient_checkpointing --micro_batch_size 8      # does GRPO with LoRA on 7B fit one GPU?
The real shapes (Qwen2.5-VL 3b / 7b, Qwen3-VL qwen3-2b / -4b / -8b) are built from their configs with
random weights (the timing does not depend on the weights' values), so nothing is downloaded. A 512 px
image gives Qwen3-VL the 256 visual tokens a 448 px image gives Qwen2.5-VL (32² against 28² px a token).
"""

import argparse
import math
import resource
import time
import unittest.mock

import numpy as np
import torch
from PIL import Image

import trainer
import vlm
from common import (add_image_args, add_runtime_args, add_sampling_args, generator_of, nonnegative_int, renamed,
                    resolve_device, resolve_dtype, seed_process)
import engine
from engine import LENGTH_MULTIPLE, ROW_MULTIPLE, STOP_EVERY, choose, round_up, sample_completions
from tiny import REAL_SHAPES, build_tiny_model, real_shape_config

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16
PEAK_GBS = {"H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # spec


def real_shape(name, tiny_dir, dtype, device, text_layers=None, vision_depth=None):
    """A random-weight model of the real size (optionally fewer layers per tower), with the tiny model's
    tokenizer for the prompts."""
    from transformers import AutoConfig
    config = real_shape_config(name, AutoConfig.from_pretrained(tiny_dir), text_layers, vision_depth)
    with torch.device(device):
        model = vlm.model_class(config)._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def add_model_args(ap):
    """The model and prompts a measurement runs on (`model_and_prompts`)."""
    a = ap.add_argument
    a("--shape", default="tiny", choices=["tiny"] + list(REAL_SHAPES), help="model size (random weights)")
    a("--family", default="qwen2_5_vl", choices=list(vlm.FAMILIES), help="the tiny shape's architecture")
    a("--model", default=None, help="a checkpoint folder instead of --shape")
    a("--text_layers", type=int, default=None, help="decoder layers of a real shape (default: the real depth)")
    a("--vision_depth", type=int, default=None, help="vision blocks of a real shape (default: the real depth)")
    add_image_args(ap)  # each image a random square of --max_pixels (default 56²; 448² = 200704: 256 tokens)
    a("--prompt", default="short", choices=["short", "listed"],
      help="listed: the toy world's open question listing its 32 base classes (runs/toy.sh's Visual-RFT and "
           "mining prompt), with a tiny tokenizer trained on the world's names")
    a("--prompt_tokens", type=nonnegative_int, default=0,
      help="lengthen the question to about this many tokens with a list of the toy world's class names (e.g. "
           "100: a question with a class list, as Visual-RFT-style prompts have)")
    renamed(ap, "--image_size", "--max_pixels, an area: --image_size 448 is --max_pixels 200704")
    renamed(ap, "--question", "--prompt")
    renamed(ap, "--question_tokens", "--prompt_tokens")


def model_and_prompts(args, device, dtype):
    """(model, processor, --prompts_per_call prompts on random images): --model, else a random-weight model of
    --shape with the tiny model's tokenizer."""
    import tempfile

    from data import prompts, toy
    question = "What is the name of the object in this image? Think, then answer."
    names = [c["name"] for c in toy.make_world(names="epithets")]
    corpus = None
    if args.prompt == "listed":
        question = prompts.open_question("toy", names[:len(names) // 2])  # the base classes
        corpus = names + [question]
    family = REAL_SHAPES[args.shape]["family"] if args.shape != "tiny" else args.family  # the prompts' processor
    tiny_dir = args.model or build_tiny_model(f"{tempfile.mkdtemp()}/tiny", seed=0, init_std=0.1, corpus=corpus,
                                              family=family)
    if args.model is None and args.shape != "tiny":
        model = real_shape(args.shape, tiny_dir, dtype, device, args.text_layers, args.vision_depth)
    else:
        model = vlm.load_model(tiny_dir, device, dtype)
    side = math.isqrt(args.max_pixels) if args.max_pixels else 56
    proc = vlm.Processor.from_pretrained(tiny_dir, args.min_pixels, side * side)
    listed = []
    while args.prompt_tokens and len(proc.tokenizer(question)["input_ids"]) < args.prompt_tokens and names:
        listed.append(names.pop(0))
        question = prompts.open_question("toy", listed)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
              for _ in range(args.prompts_per_call)]
    batch = proc.encode(images, [question] * args.prompts_per_call)
    return model, proc, batch.to(device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Best wall time of `repeats` runs after one warm-up, and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def interleaved(fns, device, repeats):
    """Best wall time of each function over `repeats` rounds that run them in turn (after a warm-up
    each), so a slow spell of a shared machine hits every contender alike; and their last results."""
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            outs[i] = fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
    return best, outs


def peak_memory_gb(device):
    if torch.device(device).type == "cuda":
        gb = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
        return gb
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (monotonic)


def saved_activation_gb(forward):
    """GB the autograd graph holds for the backward after `forward()` (each storage counted once): the
    activation memory of one micro-batch, exact on any device (a CPU process's peak RSS only ever grows,
    so it cannot compare two contenders run one after the other)."""
    storages = {}

    def pack(t):
        storages[(t.untyped_storage().data_ptr(), str(t.device))] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values()) / 2 ** 30


def flops_of(fn):
    """FLOPs of one call of `fn` (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def bandwidth_gbs(device):
    """Measured copy bandwidth: a copy reads and writes every byte once."""
    n = (1 << 30) if torch.device(device).type == "cuda" else (1 << 27)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t, _ = timed(lambda: b.copy_(a), device, 5)
    return 2 * n / t / 1e9


def matmul_tflops(device, dtype):
    n = 4096 if torch.device(device).type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    t, _ = timed(lambda: a @ a, device, 5)
    return 2 * n ** 3 / t / 1e12


def decode_rows(args, model, proc, batch, dtype, device, ours, variants, contenders, times, outs, first_call,
                graphs):
    """The decode steps against the bandwidth limit: today's eager step over the KV buffer, the static step
    eager, and compiled (on CUDA with and without CUDA graphs); a step's time: (rollout - prefill) / (N - 1).
    Bytes a step reads: the language model's weights, lm_head once (tied or not), the B embedding rows it
    gathers (not the whole table), and the KV cache: at the mean context for the buffer step (it attends to
    the columns written so far), the whole bucket for the static one."""
    P, G, N, T = args.prompts_per_call, args.num_samples, args.max_new_tokens, batch.input_ids.shape[1]
    embed = model.get_input_embeddings().weight
    lm_params = sum(p.numel() for n, p in model.named_parameters()
                    if ".visual." not in f".{n}" and p is not embed)
    if model.config.tie_word_embeddings:  # the shared matrix, left out above, is read whole as lm_head
        lm_params += model.lm_head.weight.numel()
    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads  # Qwen3-VL-4B: 128
    kv_per_col = tc.num_hidden_layers * 2 * tc.num_key_value_heads * head_dim * dtype.itemsize
    bw = bandwidth_gbs(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    spec = next((v for k, v in PEAK_GBS.items() if k in name), None)
    # the sampler alone (top-p sorts the vocabulary), eager and compiled, on logits of the real size
    logits = torch.randn(P * G, tc.vocab_size, device=device, dtype=dtype)
    sampling = dict(greedy=False, temperature=args.temperature, top_k=0, top_p=args.top_p,
                    pad_token_id=proc.pad_token_id)
    eos, banned = (torch.tensor(ids, dtype=torch.long, device=device) for ids in ([], proc.banned_token_ids))
    u, done = torch.rand(P * G, device=device), torch.zeros(P * G, dtype=torch.bool, device=device)
    sampler = lambda fn: timed(lambda: fn(logits, u, done, eos, banned, **sampling), device, args.repeats)[0]
    t_sampler = {False: sampler(choose), True: sampler(torch.compile(choose, fullgraph=True, dynamic=False))}
    names, rows, steps = list(contenders), [], {}
    for label, rollout, fn, static, compiled in variants:
        t_prefill, _ = timed(lambda: fn(1), device, args.repeats)
        t_roll = times[names.index(rollout)]
        steps[label] = step = (t_roll - t_prefill) / max(N - 1, 1)
        rows_read = round_up(P * G, ROW_MULTIPLE) if static else P * G
        cols = round_up(T + N, LENGTH_MULTIPLE) if static else T + N / 2
        step_bytes = (lm_params + rows_read * tc.hidden_size) * dtype.itemsize + rows_read * cols * kv_per_col
        rate = step_bytes / step / 1e9
        of_spec = f", {rate / spec * 100:.1f}% of spec {spec:.0f}" if spec else ""
        syncs = outs[names.index(rollout)].host_syncs if static else N  # eager: one per token
        extra = f", compile {first_call[label] - t_roll:.1f} s" if compiled else ""
        share = t_sampler[compiled] / step * 100
        rows.append((f"decode step, {label}", f"{step * 1e3:.2f} ms, {P * G / step:,.0f} tok/s",
                     f"{step_bytes / 2 ** 20:,.1f} MiB read, {rate / bw * 100:.1f}% of copy {bw:.0f} GB/s"
                     + of_spec,
                     f"{syncs} host syncs/rollout, sampler {share:.0f}% of the step{extra}"))
    fast = variants[2][0]
    t_fast = times[names.index(variants[2][1])]
    rows.append((f"decode step: eager buffer / {fast}", f"{steps['eager buffer'] / steps[fast]:.2f}x",
                 f"rollout {times[0] / t_fast:.2f}x tok/s", f"{graphs} graph(s) compiled",
                 f"end checked every {STOP_EVERY} tokens"))
    if args.agreement:  # greedy, compiled against the eager buffer step (in bf16 rounding may split them)
        a, b = ours(greedy=True).completion_ids, ours(cache_kind="compiled", greedy=True).completion_ids
        prefix = (a == b).long().cumprod(1).sum(1).float()  # tokens before a row's first difference
        rows.append((f"greedy, {fast} vs eager buffer", f"{(prefix == N).sum()}/{len(a)} rows identical",
                     f"{prefix.mean():.1f} of {N} tokens agree before the first difference", "", ""))
    return rows


def print_table(args, model, dtype, device, batch, rows):
    """Print the measurements, under a line naming the model, device and shape; returns the device's name."""
    n_params = sum(p.numel() for p in model.parameters())
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu
    print(f"\nbench: {args.model or args.shape} ({n_params / 1e6:,.1f}M parameters, "
          f"{str(dtype).removeprefix('torch.')}) on {where}; {args.prompts_per_call} prompts x "
          f"{args.num_samples} samples x {args.max_new_tokens} new tokens, "
          f"{math.isqrt(args.max_pixels or 56 ** 2)}px images, prompt {batch.input_ids.shape[1]} tokens")
    rows = [r + ("",) * (5 - len(r)) for r in rows]
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())
    return where


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    add_model_args(ap)
    a("--micro_batch_size", type=int, default=16, help="completions per forward+backward in the update")
    a("--repeats", type=int, default=5, help="timed runs after a warm-up (best is kept)")
    a("--skip_generate", action="store_true", help="do not time model.generate")
    a("--update_only", action="store_true", help="sample the completions once, time only the update")
    a("--rollout_only", action="store_true", help="time the rollouts and decode steps, not the update")
    a("--agreement", action="store_true",
      help="also decode greedily by the compiled and the eager buffer step: how many tokens agree")
    a("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    a("--lora_r", type=int, default=0, help="update with LoRA adapters of this rank, set up as grpo.py does "
                                            "(0: every weight trains, in the model's dtype)")
    a("--gradient_checkpointing", action="store_true", help="update with activation checkpointing")
    add_sampling_args(ap, num_samples=8, prompts_per_call=8, max_new_tokens=64)  # EOS disabled: every token counts
    add_runtime_args(ap)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    seed_process(args.seed)

    model, proc, batch = model_and_prompts(args, device, dtype)
    P, G, N = args.prompts_per_call, args.num_samples, args.max_new_tokens
    n_gen = P * G * N
    rows = []
    peak_memory_gb(device)

    # rollout: ours vs generate, identical work
    def ours(max_new=N, cache_kind="buffer", greedy=False):
        gen = generator_of("bench", args.seed, device=device)
        return sample_completions(model, batch, group_size=G, max_new_tokens=max_new, temperature=args.temperature,
                                  top_p=args.top_p, generator=gen, eos_token_ids=[], pad_token_id=proc.pad_token_id,
                                  banned_token_ids=proc.banned_token_ids, cache_kind=cache_kind,
                                  greedy=greedy)

    cuda = device.type == "cuda"
    plain = torch.compile(engine.decode_step_static, fullgraph=True, dynamic=False)

    def no_cuda_graphs(max_new=N):  # the compiled step without the CUDA graphs reduce-overhead adds
        with unittest.mock.patch.object(engine, "compiled_step", lambda cuda_graphs: plain):
            return ours(max_new, "compiled")

    # the decode steps: (label, rollout contender, its function, static step?, compiled?)
    variants = [("eager buffer", "rollout: ours", ours, False, False),
                ("eager static", "rollout: ours, static step", lambda n=N: ours(n, "static_eager"), True,
                 False),
                ("compiled + CUDA graphs" if cuda else "compiled", "rollout: ours, compiled step",
                 lambda n=N: ours(n, "compiled"), True, True)]
    if cuda:
        variants.append(("compiled", "rollout: ours, compiled, no CUDA graphs", no_cuda_graphs, True, True))
    if args.update_only:
        contenders = {}
        roll = ours()
    else:
        # a compiled step's first call compiles (once per bucket): its seconds and graphs, before any timing
        graphs, first_call = torch._dynamo.utils.counters["stats"]["unique_graphs"], {}
        for label, _, fn, _, compiled in variants:
            if compiled:
                first = time.perf_counter()
                fn()
                first_call[label] = time.perf_counter() - first
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        contenders = {"rollout: ours": ours, "rollout: ours, StaticCache": lambda: ours(cache_kind="static"),
                      "rollout: ours, DynamicCache": lambda: ours(cache_kind="dynamic")}
        contenders.update({name: fn for _, name, fn, static, _ in variants if static})
        if not args.skip_generate:
            def hf():
                return model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                      mm_token_type_ids=batch.mm_token_type_ids, do_sample=True, temperature=args.temperature,
                                      top_k=0, top_p=args.top_p, num_return_sequences=G, max_new_tokens=N, min_new_tokens=N,
                                      pad_token_id=proc.pad_token_id, suppress_tokens=proc.banned_token_ids)
            contenders["rollout: model.generate"] = hf
        times, outs = interleaved(list(contenders.values()), device, args.repeats)
        roll = outs[0]
        assert roll.completion_mask.sum() == n_gen
        if not args.skip_generate:
            assert outs[-1].shape == (P * G, batch.input_ids.shape[1] + N)
        for (name, fn), t in zip(contenders.items(), times):
            peak_memory_gb(device)  # reset, then one more run for this contender's own peak
            fn()
            rows.append((name, f"{n_gen / t:,.0f} tok/s", f"{t:.3f} s", f"{peak_memory_gb(device):.2f} GB"))
        t_ours = times[0]
        if not args.skip_generate:
            rows.append(("rollout: ours / generate", f"{times[-1] / t_ours:.2f}x", "", ""))
        rows += decode_rows(args, model, proc, batch, dtype, device, ours, variants, contenders, times, outs,
                            first_call, graphs)

    if args.rollout_only:
        return print_table(args, model, dtype, device, batch, rows)

    # update: scorer forward + backward over the rollout's completions, each group's prompt encoded once
    # (shared prefix, what grpo.py runs) against once per completion (per row, the reference)
    if args.lora_r:  # as grpo.py: fp32 adapters, frozen base weights, autocast
        trainer.configure_trainable(model, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                gradient_checkpointing=args.gradient_checkpointing)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mb = args.micro_batch_size
    micro = [list(range(s, min(s + mb, P * G))) for s in range(0, P * G, mb)]

    def scored(idx, shared):
        with trainer.autocast(device, dtype == torch.bfloat16):
            return trainer.sequence_logprobs(model, batch, roll.completion_ids[idx], roll.completion_mask[idx],
                                         prompt_rows=[i // G for i in idx], shared_prefix=shared)

    def update(shared):
        for idx in micro:
            (-scored(idx, shared).sum() / n_gen).backward()
        model.zero_grad(set_to_none=True)

    modes = {"shared prefix": True, "per row": False}
    times, _ = interleaved([lambda s=s: update(s) for s in modes.values()], device, max(1, args.repeats - 1))
    tokens = P * G * (batch.input_ids.shape[1] + N)  # the positions of one row per completion
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) or matmul_tflops(device, dtype)
        peak_label = f"{peak:.0f} TFLOP/s ({name})"
    else:
        peak = matmul_tflops(device, dtype)
        peak_label = f"{peak * 1e3:.0f} GFLOP/s measured matmul"
    how = (f", LoRA r{args.lora_r}" if args.lora_r else "") + (", checkpointed" if args.gradient_checkpointing else "")
    measured = {}
    for (label, shared), t in zip(modes.items(), times):
        mem = ""
        if device.type == "cuda":  # reset, then one more update for this mode's own peak
            peak_memory_gb(device)
            update(shared)
            mem = f"{peak_memory_gb(device):.2f} GB peak"
        flops = flops_of(lambda: update(shared))
        act = saved_activation_gb(lambda: scored(micro[0], shared))
        model.zero_grad(set_to_none=True)
        measured[label] = (t, flops, act)
        rows.append((f"update: fwd+bwd, {label}{how}", f"{tokens / t:,.0f} tok/s", f"{t:.3f} s",
                     f"{flops / 1e12:.2f} TFLOP, MFU {flops / t / (peak * 1e12) * 100:.1f}%",
                     f"{act:.2f} GB activations/micro-batch {mem}".rstrip()))
    (t_s, f_s, a_s), (t_r, f_r, a_r) = measured["shared prefix"], measured["per row"]
    rows.append(("update: per row / shared prefix", f"{t_r / t_s:.2f}x faster", f"{f_r / f_s:.2f}x FLOPs",
                 f"vs {peak_label}", f"{a_r / a_s:.2f}x activations"))

    where = print_table(args, model, dtype, device, batch, rows)

    if args.shape != "tiny" and args.model is None and not args.update_only:
        # projected hours of each paper recipe at this device's measured rates (one device)
        gen_rate, upd_rate = n_gen / t_ours, tokens / t_s
        prompt_len = batch.input_ids.shape[1]
        recipes = {  # (name, optimizer steps, prompts a step, G, mean completion tokens, reported budget)
            "DiVE-k (400 x 6 prompts, G 4)": (400, 6, 4, 512, "3 GPUs"),
            "SpeciaRL (175 x 256 prompts, G 10)": (175, 256, 10, 512, "~12 h on 6 GPUs"),
            "Fine-R1 TAPO (10 ep. 4-shot, G 10)": (250, 16, 10, 512, "4 GPUs"),
        }
        print(f"\nprojected hours on one {where} (mean completion 512 tokens assumed; rollout + update only):")
        for name, (steps, prompts, g, length, budget) in recipes.items():
            hours = steps * (prompts * g * length / gen_rate + prompts * g * (prompt_len + length) / upd_rate) / 3600
            print(f"  {name:38s} {hours:7.1f} h   (paper: {budget})")


if __name__ == "__main__":
    main()
