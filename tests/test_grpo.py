"""grpo.py: the formulas against per-token loops, then the trainer end to end on the tiny model."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import grpo
import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------
# formulas

def loop_token_loss(logp, old, ref, adv, i, t, eps_low, eps_high, beta):
    """docs/methods.md §4 for one token, written out."""
    ratio = torch.exp(logp[i, t] - old[i, t])
    a = adv[i]
    unclipped = ratio * a
    clipped = min(max(ratio, torch.tensor(1 - eps_low)), torch.tensor(1 + eps_high)) * a
    loss = -torch.minimum(unclipped, clipped)
    if beta:
        d = ref[i, t] - logp[i, t]
        loss = loss + beta * (torch.exp(d) - d - 1)
    return loss


def loop_loss(logp, old, ref, adv, mask, loss_type, *, eps_low, eps_high, beta, ga, l_max, n_tokens, world):
    """The aggregation of docs/methods.md §4, one token at a time."""
    B, L = mask.shape
    total, count, rows = 0.0, 0.0, []
    for i in range(B):
        row_sum, row_count = 0.0, 0.0
        for t in range(L):
            if mask[i, t]:
                l = loop_token_loss(logp, old, ref, adv, i, t, eps_low, eps_high, beta)
                row_sum, row_count = row_sum + l, row_count + 1
        rows.append(row_sum / max(row_count, 1))
        total, count = total + row_sum, count + row_count
    if loss_type == "grpo":
        return sum(rows) / B / ga
    if loss_type == "bnpo":
        return total / count / ga
    if loss_type == "dr_grpo":
        return total / (B * l_max) / ga
    return total / (n_tokens / world)


def random_case(seed, B=4, L=7):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, L, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(B, L, generator=g) * 0.3  # ratios well outside [0.8, 1.2] too
    ref = logp.detach() + torch.randn(B, L, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([7, 3, 1, 5])[:B]  # ragged; the last masked token is the EOS
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_per_token_loop_with_gradient_accumulation(loss_type, beta):
    logp, old, ref, adv, mask = random_case(0)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=beta)
    micro = [[0, 1], [2, 3]]  # GA = 2
    n_tokens = float(mask.sum())
    ours = 0.0
    for rows in micro:
        tok, _, _ = grpo.per_token_loss(logp[rows], old[rows], adv[rows], 0.2, 0.28, beta, ref[rows])
        ours = ours + grpo.aggregate(tok, mask[rows], loss_type, ga=2, l_max=7, n_tokens=n_tokens, world=1)
    g_ours, = torch.autograd.grad(ours, logp)
    ref_value = sum(loop_loss(logp[rows], old[rows], ref[rows], adv[rows], mask[rows], loss_type, ga=2, l_max=7,
                              n_tokens=n_tokens, world=1, **kw) for rows in micro)
    g_ref, = torch.autograd.grad(ref_value, logp)
    torch.testing.assert_close(ours, ref_value, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-5)
    assert (g_ours[mask == 0] == 0).all()  # padding after the EOS gets no gradient


def test_dapo_over_two_ranks_is_the_token_mean_of_the_whole_step():
    logp, old, ref, adv, mask = random_case(1)
    n_tokens = float(mask.sum())
    grads = []
    for rank_rows in ([0, 1], [2, 3]):  # each rank: its own rows, the global token count, world = 2
        tok, _, _ = grpo.per_token_loss(logp[rank_rows], old[rank_rows], adv[rank_rows], 0.2, 0.28)
        loss = grpo.aggregate(tok, mask[rank_rows], "dapo", ga=1, l_max=7, n_tokens=n_tokens, world=2)
        grads.append(torch.autograd.grad(loss, logp)[0])
    ddp = (grads[0] + grads[1]) / 2  # what DDP's gradient average gives
    tok, _, _ = grpo.per_token_loss(logp, old, adv, 0.2, 0.28)
    token_mean = (tok * mask).sum() / mask.sum()
    torch.testing.assert_close(ddp, torch.autograd.grad(token_mean, logp)[0], atol=1e-7, rtol=1e-6)


def test_clipping_stops_the_gradient_and_is_counted():
    logp = torch.zeros(2, 2, requires_grad=True)
    old = torch.tensor([[-0.5, 0.0], [0.5, 0.0]])  # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    adv = torch.tensor([1.0, -1.0])
    tok, low, high = grpo.per_token_loss(logp, old, adv, 0.2, 0.28)
    grad, = torch.autograd.grad(tok.sum(), logp)
    assert grad[0, 0] == 0 and grad[1, 0] == 0   # clipped: A>0 above 1+ε_high, A<0 below 1-ε_low
    assert grad[0, 1] == -1 and grad[1, 1] == 1  # ratio 1: plain policy gradient
    assert high.tolist() == [[True, False], [False, False]] and low.tolist() == [[False, False], [True, False]]


def test_k3_kl():
    ref, logp = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    expected = [math.exp(r - l) - (r - l) - 1 for r, l in zip(ref.tolist(), logp.tolist())]
    torch.testing.assert_close(grpo.k3(ref, logp), torch.tensor(expected))
    assert grpo.k3(ref, logp)[0] == 0 and (grpo.k3(ref, logp) >= 0).all()


def test_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = grpo.group_advantages(r, 4, "group")
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of [1, 0, 1, 0]
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-4))
    assert (a[4:] == 0).all()  # a constant group carries no signal
    torch.testing.assert_close(grpo.group_advantages(r, 4, "none"), torch.tensor([.5, -.5, .5, -.5, 0, 0, 0, 0]))
    batch_std = float(r.std())  # ddof 1 over the whole batch
    torch.testing.assert_close(grpo.group_advantages(r, 4, "batch"),
                               torch.tensor([.5, -.5, .5, -.5, 0, 0, 0, 0]) / (batch_std + 1e-4))


def test_overlong_penalty():
    lengths = torch.tensor([10, 1536, 1537, 1792, 2048])
    pen = grpo.overlong_penalty(lengths, 2048, 512)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -1 / 512, -0.5, -1.0]))
    assert (grpo.overlong_penalty(lengths, 2048, 0) == 0).all()


def test_tapo_terms_match_loop():
    logp = torch.tensor([[-1.0, -30.0, -0.1]], requires_grad=True)
    neg = torch.tensor([[-3.0, -1.0, -0.2]])
    extra, kl = grpo.tapo_terms(logp, neg, gamma=0.01, eta=0.03)
    expected = []
    for l, n in zip(logp[0].tolist(), neg[0].tolist()):
        d = max(-20.0, min(20.0, n - l))
        k = max(-10.0, min(10.0, math.exp(d) - d - 1))
        expected.append(-0.01 * k + 0.03 * -l)
    torch.testing.assert_close(extra[0], torch.tensor(expected))
    assert kl[0, 1] == 10.0  # δ = 29 → clamped to 20 → KL clamped to 10
    grad, = torch.autograd.grad(extra.sum(), logp)
    assert grad[0, 1] == -0.03  # clamped: only the entropy term's gradient is left
    d0 = -3.0 - -1.0  # unclamped token: d/dlogp of -γ(e^δ - δ - 1) + η(-logp), δ = neg - logp
    assert abs(grad[0, 0].item() - (-0.01 * (-math.exp(d0) + 1) - 0.03)) < 1e-6


# ----------------------------------------------------------------------------------------------------
# the trainer on the tiny model

def run(world, model, out, *flags):
    root, _ = world
    args = ["--model", model, "--classes", str(root / "classes.json"), "--out", str(out), "--device", "cpu",
            "--max_steps", "2", "--prompts_per_step", "4", "--num_samples", "4", "--max_new_tokens", "16",
            "--micro_batch_size", "8", "--lr", "1e-3"] + list(flags)
    if "--data" not in flags:
        args += ["--data", str(root / "mcq.jsonl")]
    grpo.main(args)
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


RECIPES = {
    "divek_mcq_full_ft": ["--reward", "mcq+format", "--loss", "grpo", "--beta", "0.04", "--num_iterations", "2"],
    "visual_rft_exact": ["--reward", "exact+format", "--prompt", "open", "--beta", "0.04", "--lora_r", "4"],
    "speciarl_dr_grpo": ["--reward", "speciarl", "--prompt", "open_world", "--loss", "dr_grpo",
                         "--scale_rewards", "none", "--beta", "0", "--lora_r", "4", "--lora_alpha", "2"],
    "speciarl_dapo": ["--reward", "speciarl", "--prompt", "open_world", "--loss", "dapo", "--beta", "0",
                      "--epsilon_high", "0.28", "--dynamic_sampling", "--max_resample", "2", "--overlong_cache", "4",
                      "--lora_r", "4", "--mini_batches", "2"],
    "tapo": ["--tapo", "--reward", "exact:0.9+format:0.1", "--loss", "dapo", "--beta", "0", "--epsilon_high", "0.28",
             "--dynamic_sampling", "--top_p", "0.99"],
    "tapo_anchor_only": ["--tapo", "--tapo_anchor_only", "--reward", "mcq+format", "--loss", "dapo", "--beta", "0"],
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_smoke(small_world, tmp_path, recipe):
    root, model = small_world
    flags = list(RECIPES[recipe])
    if recipe == "tapo":
        flags += ["--data", str(root / "triplets.jsonl")]
    log = run(small_world, model, tmp_path / recipe, *flags)
    assert [row["step"] for row in log] == [1, 2]
    for row in log:
        for k, v in row.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
    assert log[0]["completion_length"] > 0 and log[0]["entropy"] > 0
    assert log[0]["reward_std"] > 0  # the fixture's model is sometimes right: every recipe has a signal
    if "tapo" in recipe:
        assert log[0]["tapo_kl"] > 0
    if "--dynamic_sampling" in flags:
        assert all(row["draws"] >= 1 for row in log)
    if "--beta" in flags and flags[flags.index("--beta") + 1] != "0":
        assert log[-1]["kl"] > 0  # the policy moved away from the reference
    final = tmp_path / recipe / "final"
    from transformers import AutoConfig
    vlm.model_class(AutoConfig.from_pretrained(str(final))).from_pretrained(str(final))  # plain transformers loads it


@pytest.mark.parametrize("recipe", ["divek_mcq_full_ft", "tapo", "visual_rft_exact"])
def test_shared_prefix_update_equals_per_row(small_world, tmp_path, recipe):
    """One step of the update (policy, reference, old log-probs; TAPO's negative image and anchor +
    positive rows; LoRA) with each group's prompt encoded once, against one row per completion."""
    root, model = small_world
    flags = list(RECIPES[recipe]) + ["--max_steps", "1", "--lora_dropout", "0"]  # dropout: other masks
    if recipe == "tapo":
        flags += ["--data", str(root / "triplets.jsonl")]
    logs = [run(small_world, model, tmp_path / mode, *flags, "--prefix_forward", mode)[0] for mode in ("shared", "per_row")]
    for k in ("reward_mean", "loss", "kl", "entropy", "tapo_kl", "clip_low", "grad_norm"):
        assert abs(logs[0].get(k, 0.0) - logs[1].get(k, 0.0)) <= 1e-5 * max(1.0, abs(logs[1].get(k, 0.0))), k
    shared, per_row = final_weights(tmp_path / "shared"), final_weights(tmp_path / "per_row")
    start = load_file(os.path.join(model, "model.safetensors"))
    assert max(float((shared[k] - start[k]).abs().max()) for k in shared) > 1e-4  # the step moved the weights
    for k in shared:  # Adam's first step is ~lr·sign(gradient): float error moves entries whose gradient is
        # near zero by a share of lr (up to 2e-5 seen), a wrong gradient by ~lr (1e-3)
        torch.testing.assert_close(shared[k], per_row[k], atol=1e-4, rtol=0)


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


# DDP wraps the whole model, so one family is enough; FSDP2 shards by module names and gathers for sampling
@pytest.mark.parametrize("mode,family", [("ddp", "qwen2_5_vl"), ("fsdp", "qwen2_5_vl"), ("fsdp", "qwen3_vl")],
                         indirect=["family"])
def test_it_moves_only_with_signal_and_two_processes_equal_one(small_world, tmp_path, mode):
    root, model = small_world
    common = ["--model", model, "--data", str(root / "mcq.jsonl"), "--device", "cpu", "--max_steps", "2",
              "--prompts_per_step", "4", "--num_samples", "4", "--max_new_tokens", "16", "--micro_batch_size", "4",
              "--lr", "1e-3", "--prompts_per_call", "1", "--loss", "dapo", "--beta", "0.04", "--seed", "3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    grpo.main(common + ["--out", one])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "grpo.py"), "--out", two] + common
                          + (["--fsdp"] if mode == "fsdp" else []), env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    log_one = [json.loads(x) for x in open(os.path.join(one, "log.jsonl"))]
    log_two = [json.loads(x) for x in open(os.path.join(two, "log.jsonl"))]
    assert log_one[0]["reward_std"] > 0  # rewards varied: there was a learning signal
    for a, b in zip(log_one, log_two):
        for k in ("reward_mean", "accuracy", "completion_length", "kl", "loss"):
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])
    a, b, start = final_weights(one), final_weights(two), load_file(os.path.join(model, "model.safetensors"))
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lora,family", [(False, "qwen2_5_vl"), (True, "qwen2_5_vl"), (True, "qwen3_vl")],
                         indirect=["family"])
def test_stop_and_resume_equals_uninterrupted(small_world, tmp_path, monkeypatch, lora):
    root, model = small_world
    flags = ["--max_steps", "4", "--save_every", "2", "--num_iterations", "2", "--beta", "0.04"]
    if lora:
        flags += ["--lora_r", "4", "--lora_dropout", "0.1"]
    straight = run(small_world, model, tmp_path / "straight", *flags)
    real, calls = vlm.clip_gradients, {"n": 0}

    def crash(*a, **k):  # preempted during the update of step 4 (2 updates per step): step 3 is logged, not saved
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(vlm, "clip_gradients", crash)
    with pytest.raises(KeyboardInterrupt):
        run(small_world, model, tmp_path / "resumed", *flags)
    monkeypatch.setattr(vlm, "clip_gradients", real)
    resumed = run(small_world, model, tmp_path / "resumed", *flags, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # step 3 ran twice (from step 2's checkpoint), logged once
    for a, b in zip(straight, resumed):
        for k in ("reward_mean", "kl", "loss", "completion_length"):
            assert a[k] == b[k], (k, a, b)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_skips_the_update(small_world, tmp_path, monkeypatch):
    root, model = small_world
    real = grpo.per_token_loss

    def poisoned(*a, **k):
        loss, low, high = real(*a, **k)
        return loss * float("nan"), low, high

    monkeypatch.setattr(grpo, "per_token_loss", poisoned)
    log = run(small_world, model, tmp_path / "nan", "--beta", "0")
    assert log[-1]["skipped_updates"] == 2
    start, end = load_file(os.path.join(model, "model.safetensors")), final_weights(tmp_path / "nan")
    for k in start:
        assert torch.equal(start[k], end[k])  # no NaN reached the weights; nothing changed


def test_tapo_positive_is_another_image_of_the_class():
    records = [{"image": f"/x/{c}{i}.png", "label": c} for c in "ab" for i in range(3)] + \
              [{"image": "/x/only.png", "label": "c"}]
    items = grpo.Items(records, seed=0)
    confusions = {"a": [["b", 4]]}
    for k in range(30):
        rng = random.Random(k)
        pos, neg = grpo.tapo_images(records[k % 3], items, confusions, rng)
        assert pos != records[k % 3]["image"] and pos.startswith("/x/a")
        assert neg.startswith("/x/b")  # the most-confused class
    pos, neg = grpo.tapo_images(records[-1], items, {}, random.Random(0))
    assert pos == "/x/only.png" and not neg.startswith("/x/c")  # a one-image class: the anchor itself


def test_an_unusable_image_is_named_up_front_or_replaced_and_counted(small_world, tmp_path, monkeypatch):
    """An image Qwen2.5-VL cannot take (here: 402x2 pixels, over 200:1) stops the run before it starts with
    file:line; with --skip_bad it is dropped; and one that turns bad after the check is replaced by another
    item and counted, never a crash mid-run."""
    from PIL import Image
    from data.records import RecordError, read_records, write_records
    root, model = small_world
    records = read_records(str(root / "mcq.jsonl"))
    Image.new("RGB", (402, 2)).save(tmp_path / "strip.png")
    records[1]["image"] = str(tmp_path / "strip.png")
    write_records(str(tmp_path / "mcq.jsonl"), records)
    data = ["--data", str(tmp_path / "mcq.jsonl"), "--max_steps", "1"]
    with pytest.raises(RecordError, match=r"mcq.jsonl:2: .*strip.png.*200:1"):
        run(small_world, model, tmp_path / "stop", *data)
    assert run(small_world, model, tmp_path / "skip", *data, "--skip_bad")[-1]["bad_images"] == 0
    real = grpo.read_records
    monkeypatch.setattr(grpo, "read_records", lambda path, **kw: real(path, **dict(kw, check_images=False)))
    log = run(small_world, model, tmp_path / "mid", *data, "--prompts_per_step", str(len(records)))  # every item
    assert log[-1]["bad_images"] >= 1 and log[-1]["completion_length"] > 0


def test_records_the_reward_the_prompt_or_tapo_cannot_use_are_refused_before_any_work(tmp_path):
    """--reward mcq+format on open-ended records (a KeyError after the model loaded and sampled), --prompt mcq
    likewise, and --tapo on one-class data, where no anchor has a negative to draw (an IndexError mid-step):
    one line naming the first record's file:line and the flag, before the model loads (there is none here)."""
    from PIL import Image
    from data.records import write_records
    records = []
    for i in range(3):
        Image.new("RGB", (56, 56), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
        records.append({"image": str(tmp_path / f"{i}.png"), "label": "red circle"})
    write_records(tmp_path / "open.jsonl", records)
    args = ["--model", str(tmp_path / "no model"), "--data", str(tmp_path / "open.jsonl"), "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"open.jsonl:1: no 'options' and 'answer', which --reward mcq\+format needs "
                                         r"\(3 of 3 records\)"):
        grpo.main(args + ["--reward", "mcq+format"])
    with pytest.raises(SystemExit, match=r"open.jsonl:1: no 'options', which --prompt mcq needs"):
        grpo.main(args + ["--reward", "exact", "--prompt", "mcq"])
    with pytest.raises(SystemExit, match=r"open.jsonl:1: no 'negative' image and no other class .* --tapo"):
        grpo.main(args + ["--reward", "exact", "--tapo"])
