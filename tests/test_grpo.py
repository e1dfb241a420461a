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
import rollouts
import trainer
import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------
# formulas

def loop_kl(ref, logp, estimator):
    """Schulman's estimators of KL(π ‖ π_ref) for one token drawn from π, d = log π_ref/π."""
    d = ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return d * d / 2
    return torch.exp(d) - d - 1


def loop_ratio(logp, old, mask, i, t, loss_type):
    """The ratio token t of row i is clipped on: its own, or (GSPO) its sequence's from a loop over the row."""
    if loss_type not in ("gspo", "gspo_token"):
        return torch.exp(logp[i, t] - old[i, t])
    tokens = [u for u in range(mask.shape[1]) if mask[i, u]]
    s = torch.exp(sum(logp[i, u] - old[i, u] for u in tokens) / len(tokens))
    # GSPO-token: s_i's value, the gradient of π_θ(o_t)/sg(π_θ(o_t)) times s_i
    return s if loss_type == "gspo" else s.detach() * torch.exp(logp[i, t] - logp[i, t].detach())


def loop_token_loss(logp, old, ref, adv, i, t, eps_low, eps_high, beta, loss_type="grpo", mask=None, kl="k3",
                    weight=None, entropy=None, coef=0.0):
    """docs/methods.md §4 for one token, written out."""
    ratio = loop_ratio(logp, old, mask, i, t, loss_type)
    a = adv[i]
    unclipped = ratio * a
    clipped = min(max(ratio, torch.tensor(1 - eps_low)), torch.tensor(1 + eps_high)) * a
    if loss_type == "cispo":  # REINFORCE, the clipped ratio a constant weight
        loss = -(clipped.detach() * logp[i, t])
    else:
        loss = -torch.minimum(unclipped, clipped)
    if weight is not None:
        loss = loss * weight[i, t]
    if beta:
        loss = loss + beta * loop_kl(ref[i, t], logp[i, t], kl)
    if coef:
        loss = loss - coef * entropy[i, t]
    return loss


def loop_loss(logp, old, ref, adv, mask, loss_type, *, eps_low, eps_high, beta, l_max, **extra):
    """The loss of a whole optimizer step (docs/methods.md §4), one token at a time: whatever micro-batches and
    ranks the step is cut into, their aggregated losses add up to this."""
    B, L = mask.shape
    total, count, rows = 0.0, 0.0, []
    for i in range(B):
        row_sum, row_count = 0.0, 0.0
        for t in range(L):
            if mask[i, t]:
                l = loop_token_loss(logp, old, ref, adv, i, t, eps_low, eps_high, beta, loss_type, mask, **extra)
                row_sum, row_count = row_sum + l, row_count + 1
        rows.append(row_sum / max(row_count, 1))
        total, count = total + row_sum, count + row_count
    if loss_type in ("grpo", "gspo", "gspo_token"):  # GSPO: the mean of the sequences' losses
        return sum(rows) / B
    if loss_type == "dr_grpo":
        return total / (B * l_max)
    return total / count  # bnpo, dapo, cispo: the token mean of the step


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
@pytest.mark.parametrize("micro", [[[0, 1], [2, 3]], [[0], [1, 2, 3]], [[0, 1, 2], [3]], [[0], [1], [2], [3]]])
def test_loss_matches_per_token_loop_whatever_the_micro_batches(loss_type, beta, micro):
    """Micro-batches of any sizes, even ones that do not divide the step, add up to the whole step's loss."""
    logp, old, ref, adv, mask = random_case(0)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=beta)
    ours = 0.0
    for rows in micro:
        tok, _, _ = grpo.per_token_loss(logp[rows], old[rows], adv[rows], 0.2, 0.28, beta, ref[rows])
        ours = ours + grpo.aggregate(tok, mask[rows], loss_type, l_max=7, n_rows=4, n_tokens=float(mask.sum()),
                                     world=1)
    g_ours, = torch.autograd.grad(ours, logp)
    ref_value = loop_loss(logp, old, ref, adv, mask, loss_type, l_max=7, **kw)
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
        loss = grpo.aggregate(tok, mask[rank_rows], "dapo", l_max=7, n_rows=4, n_tokens=n_tokens, world=2)
        grads.append(torch.autograd.grad(loss, logp)[0])
    ddp = (grads[0] + grads[1]) / 2  # what DDP's gradient average gives
    tok, _, _ = grpo.per_token_loss(logp, old, adv, 0.2, 0.28)
    token_mean = (tok * mask).sum() / mask.sum()
    torch.testing.assert_close(ddp, torch.autograd.grad(token_mean, logp)[0], atol=1e-7, rtol=1e-6)


def off_policy_case():
    """random_case with its rows' mean log-ratios set to -0.3, 0.02, 0.3, -0.01 (as a later iteration or
    mini-batch has them) and advantages chosen so that a clip of ±0.05 acts on rows 0 (low) and 2 (high)."""
    logp, old, ref, adv, mask = random_case(2)
    spread = old - logp.detach()
    spread = spread - ((spread * mask).sum(1) / mask.sum(1))[:, None]  # each row's mean removed
    old = logp.detach() - torch.tensor([-0.3, 0.02, 0.3, -0.01])[:, None] + spread
    return logp, old, ref, torch.tensor([-1.0, 0.5, 2.0, -0.7]), mask


# clips for the tests: GSPO's must be small, a sequence ratio moving little; CISPO's default has no lower clip
TEST_CLIPS = {"gspo": (0.05, 0.08), "gspo_token": (0.05, 0.08), "cispo": (1.0, 0.2)}


@pytest.mark.parametrize("loss_type", grpo.LOSSES)
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_every_loss_and_term_matches_the_loop_off_policy_with_gradient_accumulation(loss_type, kl):
    """Ratios away from 1, a KL estimator, a rollout-correction weight and an entropy bonus: the value and the
    gradients (log-probs and entropies) against the loop."""
    logp, old, ref, adv, mask = off_policy_case()
    g = torch.Generator().manual_seed(5)
    weight = torch.rand(mask.shape, generator=g) * 2  # as rollout_weights gives: >= 0, no gradient
    entropy = torch.rand(mask.shape, generator=g).requires_grad_()
    eps_low, eps_high = TEST_CLIPS.get(loss_type, (0.2, 0.28))
    micro, n_tokens = [[0, 1], [2, 3]], float(mask.sum())
    ours = 0.0
    for rows in micro:
        tok, _, _ = grpo.per_token_loss(logp[rows], old[rows], adv[rows], eps_low, eps_high, 0.04, ref[rows],
                                        loss=loss_type, mask=mask[rows], weight=weight[rows], kl=kl,
                                        entropy=entropy[rows], entropy_coef=0.01)
        ours = ours + grpo.aggregate(tok, mask[rows], loss_type, l_max=7, n_rows=4, n_tokens=n_tokens, world=1)
    reference = loop_loss(logp, old, ref, adv, mask, loss_type, eps_low=eps_low, eps_high=eps_high, beta=0.04,
                          l_max=7, kl=kl, weight=weight, entropy=entropy, coef=0.01)
    g_ours, g_ref = torch.autograd.grad(ours, (logp, entropy)), torch.autograd.grad(reference, (logp, entropy))
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert (a[mask == 0] == 0).all()


@pytest.mark.parametrize("loss_type", ["gspo", "cispo"])
def test_later_losses_over_two_ranks_are_their_papers_mean_of_the_whole_step(loss_type):
    """GSPO: the mean over the step's sequences; CISPO: the token mean of the step; whatever the ranks hold."""
    logp, old, ref, adv, mask = off_policy_case()
    eps_low, eps_high = TEST_CLIPS[loss_type]
    n_tokens, grads = float(mask.sum()), []
    for rows in ([0, 1], [2, 3]):  # each rank: its own rows, one micro-batch, world = 2
        tok, _, _ = grpo.per_token_loss(logp[rows], old[rows], adv[rows], eps_low, eps_high, loss=loss_type,
                                        mask=mask[rows])
        loss = grpo.aggregate(tok, mask[rows], loss_type, l_max=7, n_rows=4, n_tokens=n_tokens, world=2)
        grads.append(torch.autograd.grad(loss, logp)[0])
    whole = loop_loss(logp, old, ref, adv, mask, loss_type, eps_low=eps_low, eps_high=eps_high, beta=0.0,
                      l_max=7)
    torch.testing.assert_close((grads[0] + grads[1]) / 2, torch.autograd.grad(whole, logp)[0], atol=1e-7, rtol=1e-6)


def test_gspo_clips_whole_sequences_and_its_token_form_is_the_same_here():
    """Rows 0 and 2 are outside GSPO's clip on the side their advantage pushes: no gradient on any of their
    tokens. With one advantage per sequence GSPO-token equals GSPO in value and gradient (the paper says so)."""
    logp, old, _, adv, mask = off_policy_case()
    out = {}
    for loss_type in ("gspo", "gspo_token"):
        tok, low, high = grpo.per_token_loss(logp, old, adv, 0.05, 0.08, loss=loss_type, mask=mask)
        value = grpo.aggregate(tok, mask, loss_type, l_max=7, n_rows=4, n_tokens=float(mask.sum()), world=1)
        out[loss_type] = value, torch.autograd.grad(value, logp)[0]
        assert low[:, 0].tolist() == [True, False, False, False] and high[:, 0].tolist() == [False, False, True, False]
    grad = out["gspo"][1]
    assert (grad[[0, 2]] == 0).all() and (grad[[1, 3]][mask[[1, 3]] > 0] != 0).all()
    torch.testing.assert_close(out["gspo_token"][0], out["gspo"][0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(out["gspo_token"][1], grad, atol=1e-7, rtol=1e-6)


def test_cispo_clips_the_weight_not_the_gradient():
    logp = torch.zeros(2, 2, requires_grad=True)
    old = torch.tensor([[-0.5, 0.0], [0.5, 0.0]])  # ratios e^0.5 = 1.65 and e^-0.5 = 0.61
    adv = torch.tensor([1.0, -1.0])
    eps_low = grpo.CLIP_DEFAULTS["cispo"][0]  # the default: no lower clip
    tok, low, high = grpo.per_token_loss(logp, old, adv, eps_low, 0.2, loss="cispo")
    grad, = torch.autograd.grad(tok.sum(), logp)
    # where PPO's clip gives no gradient, CISPO's gives A times the clipped weight: 1.2, or 0.61 (no lower clip)
    torch.testing.assert_close(grad, torch.tensor([[-1.2, -1.0], [math.exp(-0.5), 1.0]]))
    assert high.tolist() == [[True, False], [False, False]] and not low.any()


def test_kl_estimators():
    ref, logp = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    for estimator in ("k1", "k2", "k3"):
        expected = torch.stack([loop_kl(r, l, estimator) for r, l in zip(ref, logp)])
        torch.testing.assert_close(grpo.kl_penalty(ref, logp, estimator), expected)
    torch.testing.assert_close(grpo.kl_penalty(ref, logp, "k3"), grpo.k3(ref, logp))


def sampler_case():
    """Train-side and sampler log-probs of 3 ragged rows; row 2 was sampled under another prompt (NaN)."""
    g = torch.Generator().manual_seed(4)
    train = -torch.rand(3, 5, generator=g) * 3
    sampler = train + torch.randn(3, 5, generator=g) * 0.3
    sampler[2] = float("nan")
    mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4])[:, None]).float()
    return train, sampler, mask


def test_sampler_gap_matches_loop():
    train, sampler, mask = sampler_case()
    gap = grpo.sampler_gap(train, sampler, mask)
    d = [float(train[i, t] - sampler[i, t]) for i in range(3) for t in range(5) if mask[i, t] and i != 2]
    assert gap["gap_tokens"] == len(d) == 7
    assert abs(gap["gap_abs"] - sum(abs(x) for x in d)) < 1e-5
    assert abs(gap["gap_kl"] - sum(math.exp(x) - x - 1 for x in d)) < 1e-6  # k3 of KL(π_sampler ‖ π_train)
    assert gap["gap_outside"] == sum(not 0.8 <= math.exp(x) <= 1.25 for x in d) > 0


@pytest.mark.parametrize("kind", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_weights_match_loop(kind, level):
    train, sampler, mask = sampler_case()
    cap = 1.1
    w = grpo.rollout_weights(train, sampler, mask, kind, cap, level).expand(3, 5)
    for i in range(3):
        rhos = [math.exp(train[i, t] - sampler[i, t]) if i != 2 else 1.0 for t in range(5) if mask[i, t]]
        if level == "sequence":
            rhos = [math.prod(rhos)] * len(rhos)
        expected = [min(x, cap) if kind == "tis" else (x if x <= cap else 0.0) for x in rhos]
        torch.testing.assert_close(w[i, :len(expected)], torch.tensor(expected), atol=1e-6, rtol=1e-5)
    assert (w[mask > 0] != 1).any() and (w[2] == 1).all()  # row 2's sampler log-probs unknown: no correction


def test_rollout_correction_changes_nothing_when_sampler_and_trainer_agree():
    logp, old, ref, adv, mask = random_case(3)
    plain, _, _ = grpo.per_token_loss(logp, old, adv, 0.2, 0.28, 0.04, ref)
    plain_grad, = torch.autograd.grad(plain.sum(), logp)
    for kind in ("tis", "mis"):
        for level in ("token", "sequence"):
            w = grpo.rollout_weights(old, old.clone(), mask, kind, 2.0, level)
            assert (w == 1).all()
            tok, _, _ = grpo.per_token_loss(logp, old, adv, 0.2, 0.28, 0.04, ref, weight=w)
            assert torch.equal(tok, plain.detach())
            assert torch.equal(torch.autograd.grad(tok.sum(), logp)[0], plain_grad)


def test_truncated_means_the_length_limit_without_an_eos():
    ids = torch.tensor([[5, 6, 7, 9], [5, 2, 0, 0], [5, 6, 7, 2], [2, 0, 0, 0]])
    lengths = torch.tensor([4.0, 2.0, 4.0, 1.0])  # as Rollouts has them: mask sums
    assert grpo.truncated(ids, lengths, 4, [2, 3]).tolist() == [True, False, False, False]


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


def test_the_sampler_gap_is_logged_and_in_fp32_nothing_so_the_correction_changes_nothing(small_world, tmp_path):
    """CPU, fp32: the sampler's log-probs (KV-cached decode) against the trainer's (one forward), on-policy
    (the update's own) and off-policy (the old ones, --num_iterations 2): rounding apart, equal; so
    --rollout_correction tis changes neither the step's metrics nor its weights."""
    root, model = small_world
    logs = {name: run(small_world, model, tmp_path / name, "--max_steps", "1", *flags)[0] for name, flags in {
        "on_policy": [], "off_policy": ["--num_iterations", "2"], "tis": ["--rollout_correction", "tis"]}.items()}
    for row in logs.values():
        assert row["sampler_gap_abs"] <= 1e-5 and 0 <= row["sampler_gap_kl"] <= 1e-10, row
        assert row["sampler_gap_outside"] == 0
    plain, tis = logs["on_policy"], logs["tis"]
    for k in ("loss", "kl", "entropy", "clip_low", "grad_norm"):
        assert abs(plain[k] - tis[k]) <= 1e-5 * max(1.0, abs(plain[k])), k
    a, b = final_weights(tmp_path / "on_policy"), final_weights(tmp_path / "tis")
    for k in a:  # Adam's first step: see test_shared_prefix_update_equals_per_row
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)


def test_mask_truncated_and_the_entropy_bonus_reach_the_loss(small_world, tmp_path, monkeypatch):
    """--mask_truncated: the cut completions' tokens are left out of every term and count; --entropy_coef: the
    entropies come with their gradient."""
    root, model = small_world
    seen = {"aggregated": 0.0}
    cut, aggregate, per_token_loss = grpo.truncated, grpo.aggregate, grpo.per_token_loss

    def spy_cut(ids, lengths, *a):
        seen["cut"], seen["lengths"] = cut(ids, lengths, *a), lengths
        return seen["cut"]

    def spy_aggregate(tok, mask, *a, **k):
        seen["aggregated"] += float(mask.sum())
        return aggregate(tok, mask, *a, **k)

    def spy_loss(*a, **k):
        assert k["entropy_coef"] == 0.5 and k["entropy"].requires_grad
        return per_token_loss(*a, **k)

    monkeypatch.setattr(grpo, "truncated", spy_cut)
    monkeypatch.setattr(grpo, "aggregate", spy_aggregate)
    monkeypatch.setattr(grpo, "per_token_loss", spy_loss)
    run(small_world, model, tmp_path / "cut", "--max_steps", "1", "--max_new_tokens", "8", "--mask_truncated",
        "--entropy_coef", "0.5")
    assert seen["cut"].any() and not seen["cut"].all()  # 8 tokens: some completions end, some are cut
    assert seen["aggregated"] == float(seen["lengths"][~seen["cut"]].sum())


# DDP runs of the later losses: a second iteration (ratios away from 1), every new term
LATER_DDP = {"gspo": ["--loss", "gspo", "--num_iterations", "2", "--rollout_correction", "mis",
                      "--rollout_correction_level", "sequence"],
             "cispo": ["--loss", "cispo", "--num_iterations", "2", "--kl_estimator", "k2", "--entropy_coef", "0.01",
                       "--rollout_correction", "tis", "--mask_truncated"]}


# DDP wraps the whole model, so one family is enough; FSDP2 shards by module names and gathers for sampling.
# fsdp_compiled: the compiled decode step over weights FSDP2 gathers anew for each rollout, against one
# process decoding with the eager static step (the per-row streams make the samples the same)
@pytest.mark.parametrize("mode,family", [("ddp", "qwen2_5_vl"), ("fsdp", "qwen2_5_vl"), ("fsdp", "qwen3_vl"),
                                         ("gspo", "qwen2_5_vl"), ("cispo", "qwen2_5_vl"),
                                         ("fsdp_compiled", "qwen2_5_vl")], indirect=["family"])
def test_it_moves_only_with_signal_and_two_processes_equal_one(small_world, tmp_path, mode):
    root, model = small_world
    common = ["--model", model, "--data", str(root / "mcq.jsonl"), "--device", "cpu", "--max_steps", "2",
              "--prompts_per_step", "4", "--num_samples", "4", "--max_new_tokens", "16", "--micro_batch_size", "4",
              "--lr", "1e-3", "--prompts_per_call", "1", "--loss", "dapo", "--beta", "0.04", "--seed", "3"]
    common += LATER_DDP.get(mode, [])  # a flag given twice: the later one counts
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    grpo.main(common + ["--out", one] + (["--decode", "static"] if mode == "fsdp_compiled" else []))
    # TORCH_LOGS=recompiles: a step recompiled for the second rollout's newly gathered weights would say so
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TORCH_LOGS="recompiles")
    flags = {"fsdp": ["--fsdp"], "fsdp_compiled": ["--fsdp", "--decode", "compiled"]}.get(mode, [])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "grpo.py"), "--out", two] + common + flags, env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ecompiling" not in done.stderr, done.stderr[-3000:]
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
    real, calls = trainer.clip_gradients, {"n": 0}

    def crash(*a, **k):  # preempted during the update of step 4 (2 updates per step): step 3 is logged, not saved
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "clip_gradients", crash)
    with pytest.raises(KeyboardInterrupt):
        run(small_world, model, tmp_path / "resumed", *flags)
    monkeypatch.setattr(trainer, "clip_gradients", real)
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


def test_the_class_balanced_stream_gives_each_step_distinct_classes():
    records = [{"image": f"/x/{c}{i}.png", "label": c} for c in "abcdefgh" for i in range(5)]
    plain, balanced = rollouts.Items(records, seed=0), rollouts.Items(records, seed=0, class_balanced=True)
    for stream in (plain, balanced):  # both: every record once an epoch, a new order the next
        assert sorted(stream[i]["image"] for i in range(40)) == sorted(r["image"] for r in records)
        assert [stream[i]["image"] for i in range(40)] != [stream[i]["image"] for i in range(40, 80)]
    steps = [{balanced[i]["label"] for i in range(s, s + 4)} for s in range(0, 80, 4)]  # steps of 4 prompts
    assert all(len(labels) == 4 for labels in steps)  # four distinct classes in every step
    assert any(len({plain[i]["label"] for i in range(s, s + 4)}) < 4 for s in range(0, 80, 4))


def test_tapo_positive_is_another_image_of_the_class():
    records = [{"image": f"/x/{c}{i}.png", "label": c} for c in "ab" for i in range(3)] + \
              [{"image": "/x/only.png", "label": "c"}]
    items = rollouts.Items(records, seed=0)
    confusions = {"a": [["b", 4]]}
    for k in range(30):
        rng = random.Random(k)
        pos, neg = rollouts.tapo_images(records[k % 3], items, confusions, rng)
        assert pos != records[k % 3]["image"] and pos.startswith("/x/a")
        assert neg.startswith("/x/b")  # the most-confused class
    pos, neg = rollouts.tapo_images(records[-1], items, {}, random.Random(0))
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


def test_dynamic_sampling_logs_the_reward_of_every_drawn_completion(monkeypatch):
    """The kept groups' reward sits near half right by construction; reward_drawn is every draw's mean."""
    from types import SimpleNamespace

    class Fake:  # the part of Rollouts that collect_rollouts reads
        def __init__(self, rewards, G=2):
            self.rewards, self.group_size = torch.tensor(rewards, dtype=torch.float32), G
            self.details = [{"reward": x, "correct": x == 1.0, "format": 1.0} for x in rewards]
        varied_groups = rollouts.Rollouts.varied_groups

        def select(self, groups):
            return Fake([float(self.rewards[g * self.group_size + j]) for g in groups for j in range(self.group_size)])

        def __len__(self):
            return len(self.rewards)

    monkeypatch.setattr(rollouts.Rollouts, "cat", staticmethod(lambda parts: Fake([float(x) for p in parts for x in p.rewards])))
    draws = iter([[1, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0]])  # 3 groups of 2 a draw: 1 varied, then 2 of 3
    sample = lambda records, first: Fake(next(draws))
    d = SimpleNamespace(rank=0, world_size=1, device="cpu")
    args = SimpleNamespace(prompts_per_step=3, dynamic_sampling=True, max_resample=1)
    r, cursor, info = rollouts.collect_rollouts(SimpleNamespace(items=list(range(10)), rollout=sample, args=args), 0, d)
    assert cursor == 6 and info["draws"] == 2 and info["filled_groups"] == 0
    assert r.rewards.tolist() == [1, 0, 0, 1, 1, 0]  # the three varied groups: half right by construction
    assert info["reward_drawn"] == pytest.approx(7 / 12) and info["accuracy_drawn"] == pytest.approx(7 / 12)
    draws = iter([[1, 0, 1, 1, 0, 0]])
    args = SimpleNamespace(prompts_per_step=3, dynamic_sampling=False, max_resample=1)
    r, _, info = rollouts.collect_rollouts(SimpleNamespace(items=list(range(10)), rollout=sample, args=args), 0, d)
    assert info["reward_drawn"] == pytest.approx(float(r.rewards.mean())) == pytest.approx(0.5)

    # an extra draw takes what the shortfall needs at the rate kept so far: 3 of 4 kept -> 1 short at 3/4 -> 2 items
    asked = []
    draws = iter([[1, 0, 0, 1, 1, 1, 1, 0], [1, 0, 1, 1]])
    def sample(records, first):
        asked.append((list(records), first))
        return Fake(next(draws))
    args = SimpleNamespace(prompts_per_step=4, dynamic_sampling=True, max_resample=1)
    r, cursor, info = rollouts.collect_rollouts(SimpleNamespace(items=list(range(10)), rollout=sample, args=args), 0, d)
    assert asked == [([0, 1, 2, 3], 0), ([4, 5], 4)] and cursor == 6
    assert info["draws"] == 2 and info["filled_groups"] == 0 and r.rewards.tolist() == [1, 0, 0, 1, 1, 0, 1, 0]
    assert info["reward_drawn"] == pytest.approx(8 / 12)


def test_a_malformed_confusions_file_is_named_with_what_is_wrong(tmp_path):
    """--confusions (mine_topk.py's confusions.json: {class: [[class, times answered], ...]}) is read and
    checked like classes.json: a JSON list failed at rollouts.tapo_images' `.get`, a string value mid-run,
    a cp1252 file with a bare UnicodeDecodeError."""
    from data.records import RecordError, load_confusions
    table = {"classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
    path = tmp_path / "confusions.json"
    path.write_text('{\n "a": [["b", 3]],\n "b": []\n}\n')
    assert load_confusions(path, table) == {"a": [["b", 3]], "b": []}
    for bad, reason in [
            ([["a", "b", 3]], "expected a JSON object mapping each class to a list of [class, count] pairs "
                              "(mine_topk.py's confusions.json), got a list"),
            ({"a": "b"}, "class 'a': expected a list of [class, count] pairs, got a str"),
            ({"a": [["b"]]}, "class 'a', pair #1: expected [class, count], got ['b']"),
            ({"a": [["b", "3"]]}, "class 'a', pair #1: expected [class, count], got ['b', '3']"),
            ({"a": [["b", -1]]}, "class 'a', pair #1: expected [class, count], got ['b', -1]"),
            ({"a": [["b", True]]}, "class 'a', pair #1: expected [class, count], got ['b', True]"),
            ({"a": [["c", 2]]}, "class 'a', pair #1: 'c' is not a class of the class table"),
            ({"c": []}, "class 'c' is not a class of the class table")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError) as e:
            load_confusions(path, table)
        assert str(e.value) == f"{path}: {reason}"
    assert load_confusions(path) == {"c": []}  # without a class table, any names
    path.write_bytes(b'{\n "a": [["Caf\xe9", 2]]\n}\n')
    with pytest.raises(RecordError, match=r"confusions.json:2: not UTF-8 text \(byte 0xe9"):
        load_confusions(path, table)


def test_grpo_refuses_a_malformed_confusions_file_before_the_model_loads(tmp_path):
    from PIL import Image
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "a.png")
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"image": "a.png", "label": label}) + "\n" for label in "ab"))
    classes = {"classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    (tmp_path / "confusions.json").write_text('[["a", "b", 3]]')
    # refused before the model loads: not "model folder not found"
    with pytest.raises(ValueError, match="confusions.json: expected a JSON object"):
        grpo.main(["--model", str(tmp_path / "no_model"), "--data", str(records), "--classes",
                   str(tmp_path / "classes.json"), "--confusions", str(tmp_path / "confusions.json"),
                   "--out", str(tmp_path / "out"), "--reward", "exact", "--prompt", "open", "--tapo",
                   "--device", "cpu"])


def test_grpo_checks_names_and_aliases_across_its_data_files(tmp_path):
    """Two --data files whose records give two classes one alias: each file alone is fine, so the check per
    file let an answer 'sea bird' be credited to both; grpo refuses it, naming both lines, before loading."""
    from PIL import Image
    from data.records import RecordError
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "a.png")
    for name, label in (("a", "x"), ("b", "y")):
        record = {"image": "a.png", "label": label, "aliases": ["sea bird"]}
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(record))
    with pytest.raises(RecordError, match=r"b.jsonl:1: alias 'sea bird' of 'y' also names class 'x' "
                                          r"\(alias 'sea bird' at .*a.jsonl:1\)"):
        grpo.main(["--model", str(tmp_path / "no_model"), "--data", str(tmp_path / "a.jsonl"),
                   str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "out"), "--reward", "exact", "--prompt",
                   "open", "--device", "cpu"])


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_static_decode_samples_the_same_whatever_the_prompts_per_call(small_world, tmp_path):
    """--decode static seeds each prompt row by its own stream item, so one prompt per sampler call and
    four per call draw the same completions (the eager default does so only with --prompts_per_call 1)."""
    root, model = small_world
    flags = ["--decode", "static", "--reward", "exact+format", "--prompt", "open", "--data",
             str(root / "train.jsonl"), "--temperature", "1.0", "--seed", "5"]
    one = run(small_world, model, tmp_path / "one", "--prompts_per_call", "1", *flags)
    four = run(small_world, model, tmp_path / "four", "--prompts_per_call", "4", *flags)
    keys = ("reward_mean", "reward_std", "accuracy", "format", "completion_length")
    assert [[row[k] for k in keys] for row in one] == [[row[k] for k in keys] for row in four]
    assert len({row["completion_length"] for row in one}) > 1 or one[0]["reward_std"] > 0  # it did sample
