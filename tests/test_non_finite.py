"""Nothing non-finite is ever written: numeric flags refuse inf and NaN by name, a run whose weights or
gradients turn non-finite stops with a clear error before saving, and no checkpoint holds a NaN."""
import glob
import os

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import grpo
import reward
import sft
import trainer

COMMON = ["--batch_size", "4", "--micro_batch_size", "2", "--lr", "1e-3", "--max_steps", "4", "--device", "cpu"]


@pytest.mark.parametrize("flag", ["--lr", "--beta", "--entropy_coef", "--epsilon_high", "--epsilon_low",
                                  "--rollout_correction_cap", "--gamma", "--weight_decay", "--epochs"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numeric_flags_are_refused_by_name(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        grpo.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", f"{flag}={value}"])
    assert e.value.code == 2 and f"argument {flag}: must be a finite number" in capsys.readouterr().err
    if flag in ("--lr", "--weight_decay", "--epochs"):
        with pytest.raises(SystemExit):
            sft.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", f"{flag}={value}"])


def test_a_non_finite_reward_weight_is_refused():
    with pytest.raises(ValueError, match="a finite number"):
        reward.parse_reward("exact:inf+format")
    with pytest.raises(ValueError, match="a finite number"):
        reward.parse_reward("exact:nan")


def test_no_checkpoint_holds_a_non_finite_weight(tiny, tmp_path):
    model, processor = tiny
    model = type(model)(model.config)  # a copy to poison
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        checkpoint.save_checkpoint(model, processor, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_weights_made_non_finite_stop_the_run_and_keep_the_good_checkpoint(squares, tmp_path, monkeypatch):
    _, data, model_dir = squares
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def second_step_poisons(self, *a, **k):  # as an infinite learning rate would, from the second step on
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] >= 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", second_step_poisons)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="non-finite"):
        sft.main(["--model", model_dir, "--data", data, "--out", out, "--save_every", "1"] + COMMON)
    assert [os.path.basename(p) for p in glob.glob(os.path.join(out, "step_*"))] == ["step_000001"]
    assert not os.path.exists(os.path.join(out, "final"))
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(out, "step_000001", "model.safetensors")).values())


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_a_run_of_non_finite_gradients_stops_the_run(squares, tmp_path, monkeypatch):
    """One non-finite gradient skips its update (tests/test_grpo.py); MAX_SKIPPED in a row stop the run."""
    _, data, model_dir = squares
    monkeypatch.setattr(trainer, "clip_gradients", lambda params, max_norm: float("nan"))
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=f"{trainer.MAX_SKIPPED} updates in a row had a non-finite"):
        sft.main(["--model", model_dir, "--data", data, "--out", out] + COMMON)
    assert not os.path.exists(os.path.join(out, "final"))
