"""grpo.update's gradient is each loss's formula over the whole optimizer step, whatever the micro-batch size
(one that does not divide the step included) and the number of processes (2 gloo ranks under DDP): the
update of the tiny model against the formula written out over every completion of the step at once.

Both score one prompt per completion (--prefix_forward per_row), so that the whole step in one micro-batch
gives the reference's gradient bit for bit. In float64 every micro-batch size agrees to 1e-6 (measured: 5e-16);
in fp32 other micro-batch sizes differ by rounding alone, measured at 0.2-2e-6 of the norm (rows in batches
of 1 against 12), hence 1e-5 there. Aggregating per micro-batch, as this code once did, is off by 0.25-0.3
when the micro-batch size does not divide the step."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import grpo
import trainer
from common import Dist, generator_of
from conftest import random_image
from rollouts import Rollouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, G, L = 4, 3, 6  # 4 prompts x 3 completions = 12 rows of up to 6 tokens
QUESTION = "What is the name of the shape in this image?"


def make_args(tiny_dir, loss, micro_batch_size):
    # no gradient clipping: the gradient itself is compared; β > 0: the KL term against the frozen start too;
    # one prompt per completion in the forward, as the reference
    return grpo.parse_args(["--model", tiny_dir, "--data", "unused.jsonl", "--out", "unused", "--device", "cpu",
                            "--loss", loss, "--micro_batch_size", str(micro_batch_size), "--beta", "0.04",
                            "--grad_clip", "0", "--prefix_forward", "per_row", "--num_samples", str(G), "--max_new_tokens", str(L)])


def step_case(processor, groups):
    """The step's rollouts restricted to `groups` (fixed tokens, ragged lengths) and their advantages."""
    g = generator_of("update-gradient")
    ids = torch.randint(20, 200, (P * G, L), generator=g)
    lengths = torch.randint(1, L + 1, (P * G,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    adv = torch.randn(P * G, generator=g)
    rows = [k * G + j for k in groups for j in range(G)]
    prompts = processor.encode([random_image(56, 56 + 28 * (k % 2), k) for k in groups], [QUESTION] * len(groups))
    r = Rollouts(prompts, [i // G for i in range(len(rows))], ids[rows], mask[rows], torch.zeros(len(rows)),
                 lengths[rows], [{}] * len(rows), G)
    return r, adv[rows]


def setup(args, d, dtype):
    training = trainer.setup_training(args, d, 1, reference=True)
    if dtype == torch.float64:  # one process: cast in place (the optimizer holds the same parameters)
        training.policy.double()
        training.reference.double()
    return training


def update_gradient(tiny_dir, loss, micro_batch_size, d=Dist(), groups=range(P), dtype=torch.float32):
    """{parameter: gradient} of one grpo.update on this rank's `groups` (DDP averages it over ranks)."""
    args = make_args(tiny_dir, loss, micro_batch_size)
    training = setup(args, d, dtype)
    r, adv = step_case(training.processor, list(groups))
    grads, real = {}, trainer.clip_gradients

    def capture(params, max_norm):
        grads.update({n: p.grad.clone() for n, p in training.policy.named_parameters() if p.grad is not None})
        return real(params, max_norm)
    trainer.clip_gradients = capture
    try:
        training.policy.train()
        grpo.update(grpo.step_targets(r, adv, training, args), training, args, d)
    finally:
        trainer.clip_gradients = real
    return grads


def whole_step_gradient(tiny_dir, loss, dtype=torch.float32):
    """The formula over all 12 completions in one forward (one prompt per completion, the reference path)."""
    args = make_args(tiny_dir, loss, P * G)
    training = setup(args, Dist(), dtype)
    r, adv = step_case(training.processor, list(range(P)))
    ref = trainer.score_completions(training.reference, r.prompts, r.prompt_rows, r.ids, r.mask,
                                    micro_batch_size=P * G, shared_prefix=False)
    training.policy.train()
    logp = training.policy(r.prompts, r.ids, r.mask, r.prompt_rows, shared_prefix=False)
    tok, _, _ = grpo.per_token_loss(logp, logp.detach(), adv, args.epsilon_low, args.epsilon_high, args.beta, ref,
                                    loss=loss, mask=r.mask)
    m = r.mask
    if loss in ("grpo", "gspo", "gspo_token"):   # the mean over completions of each one's token mean
        value = ((tok * m).sum(1) / m.sum(1)).mean()
    elif loss == "dr_grpo":                      # the tokens' sum over completions x L_max
        value = (tok * m).sum() / (len(m) * L)
    else:                                        # bnpo, dapo, cispo: the token mean of the step
        value = (tok * m).sum() / m.sum()
    value.backward()
    return {n: p.grad for n, p in training.policy.named_parameters() if p.grad is not None}


def assert_same(grads, reference, loss, how, bound=1e-5):
    assert grads.keys() == reference.keys()
    diff = torch.sqrt(sum(((grads[k] - reference[k]) ** 2).sum() for k in grads))
    norm = torch.sqrt(sum((reference[k] ** 2).sum() for k in grads))
    assert norm > 0 and diff / norm <= bound, f"{loss}, {how}: relative difference {float(diff / norm):.2e}"


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("loss", grpo.LOSSES)
def test_the_update_is_the_whole_step_whatever_the_micro_batch(tiny_dir, loss, dtype, bound):
    reference = whole_step_gradient(tiny_dir, loss, dtype)
    for mbs in (1, 3, 5, P * G):
        grads = update_gradient(tiny_dir, loss, mbs, dtype=dtype)
        assert next(iter(grads.values())).dtype == dtype
        assert_same(grads, reference, loss, f"micro-batch {mbs}", bound)


WORKER = """
import sys
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
import grpo
from common import cleanup, init_distributed
from test_update_gradient import P, update_gradient
d = init_distributed("cpu")
for loss in grpo.LOSSES:  # each rank its half of the groups, micro-batches of 5 (uneven)
    grads = update_gradient({tiny!r}, loss, 5, d, groups=range(d.rank * P // 2, (d.rank + 1) * P // 2))
    if d.rank == 0:
        save_file({{k.replace("module.", ""): v.contiguous() for k, v in grads.items()}}, {out!r} + loss)
cleanup()  # tear gloo down before the interpreter exits: left to exit, its threads can abort the process
"""


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_two_processes_give_the_whole_step(tiny_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)), tiny=tiny_dir,
                                    out=str(tmp_path / "grad_")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for loss in grpo.LOSSES:
        assert_same(load_file(str(tmp_path / f"grad_{loss}")), whole_step_gradient(tiny_dir, loss), loss, "2 ranks")
