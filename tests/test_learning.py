"""Does GRPO learn? The check a reader needs to trust the loss: on the tiny model, the real sampler and the
real update (grpo.update: shared-prefix forward, aggregation, AdamW) raise a reward the model can learn
from its own samples, and do not move the same quantity when the reward ignores the completion.

The learnable reward is the share of a completion's tokens that fall in a fixed half of the vocabulary:
the tiny model samples those about half the time, so every group has varied rewards, and the policy can
raise the share by shifting probability between tokens it already samples. Same seeds, same prompts, the
same number of steps; only the reward differs. Negating the advantages (what a sign error in the loss
does) must lower the share instead: the test is only worth something if it can fail."""

import pytest
import torch

import grpo
import rollouts
import trainer
from common import Dist, generator_of
from conftest import QUESTIONS, random_image
from engine import sample_completions

STEPS, G, L = 12, 8, 12


def in_half(ids, vocab_size):
    """1 where a token id is in the rewarded half of the vocabulary (a fixed, seeded choice)."""
    half = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))[:vocab_size // 2]
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[half] = True
    return table[ids].float()


def train(tiny_dir, tmp_path, reward, sign=1.0):
    """STEPS GRPO steps on 3 prompts x G samples; returns the sampled share of rewarded tokens per step."""
    args = grpo.parse_args(["--model", tiny_dir, "--data", "unused.jsonl", "--out", str(tmp_path), "--device", "cpu",
                            "--num_samples", str(G), "--max_new_tokens", str(L), "--micro_batch_size", str(3 * G),
                            "--lr", "2e-3", "--beta", "0", "--loss", "grpo"])
    d = Dist()
    torch.manual_seed(0)
    training = trainer.setup_training(args, d, STEPS)
    proc = training.processor
    images = [random_image(56, 56, 0), random_image(84, 56, 1), random_image(56, 112, 2)]
    prompts = proc.encode(images, QUESTIONS)
    vocab = training.policy.vlm.lm_head.weight.shape[0]
    share = []
    for step in range(STEPS):
        with trainer.generation_mode(training.policy):
            roll = sample_completions(training.policy, prompts, group_size=G, max_new_tokens=L, temperature=1.0,
                                      generator=generator_of("sanity", step), **proc.sampling_tokens)
        ids, mask = roll.completion_ids, roll.completion_mask
        hits = (in_half(ids, vocab) * mask).sum(1) / mask.sum(1)
        share.append(float(hits.mean()))
        rewards = reward(hits, step)
        r = rollouts.Rollouts(prompts, [i // G for i in range(len(ids))], ids, mask, rewards, mask.sum(1),
                          [{}] * len(ids), G, sampler_logp=roll.logprobs)
        adv = sign * grpo.group_advantages(rewards, G)
        training.policy.train()
        grpo.update(grpo.step_targets(r, adv, training, args), training, args, d)
    return share


def rise(share):
    """Mean of the last quarter of steps minus the first quarter."""
    q = max(1, len(share) // 4)
    return sum(share[-q:]) / q - sum(share[:q]) / q


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    noise = lambda hits, step: torch.rand(len(hits), generator=generator_of("noise", step))
    return {"learnable": train(tiny_dir, tmp_path_factory.mktemp("a"), lambda hits, step: hits),
            "ignores the completion": train(tiny_dir, tmp_path_factory.mktemp("b"), noise),
            "advantage negated": train(tiny_dir, tmp_path_factory.mktemp("c"), lambda hits, step: hits, sign=-1.0)}


def test_grpo_raises_a_learnable_reward(runs):
    share = runs["learnable"]
    assert 0.2 < share[0] < 0.8, share  # the start samples both halves: there is something to learn
    assert rise(share) >= 0.15, share


def test_a_reward_that_ignores_the_completion_does_not_move_it(runs):
    assert abs(rise(runs["ignores the completion"])) < 0.08, runs["ignores the completion"]
    assert rise(runs["learnable"]) > 3 * abs(rise(runs["ignores the completion"]))


def test_a_sign_error_would_be_caught(runs):
    """With the advantages negated the same run lowers the share: what the two tests above would see if
    the loss pushed the wrong way."""
    assert rise(runs["advantage negated"]) <= -0.15, runs["advantage negated"]
