"""sft.py: the loss masks all but assistant tokens, a tiny model overfits, 2 ranks = 1 rank, resume = no stop."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import sft
import engine
import checkpoint
import trainer
import vlm
from data.records import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_is_hf_labels_loss_on_assistant_tokens_only(squares):
    """Our token-mean NLL over completions equals transformers' own loss with labels = -100 on every
    prompt and padding position (the slow reference of 'labels mask everything but the assistant')."""
    _, data, model_dir = squares
    model, proc = vlm.load_model(model_dir), vlm.Processor.from_pretrained(model_dir)
    records = read_records(data)[:3]
    args = sft.parse_args(["--model", "m", "--data", data, "--out", "o"])
    examples = [sft.make_example(r, args, None) for r in records]
    examples[1] = (examples[1][0], examples[1][1] + " A longer question.", examples[1][2] + " more")
    batch, ids, mask, bad = sft.encode_examples(examples, proc, "cpu", 4096)
    assert bad == 0
    with torch.no_grad():
        ours = -(trainer.sequence_logprobs(model, batch, ids, mask)).sum() / mask.sum()
        T = batch.input_ids.shape[1]
        labels = torch.cat([torch.full_like(batch.input_ids, -100), ids.masked_fill(mask == 0, -100)], 1)
        pos = batch.next_positions()[..., None] + torch.arange(ids.shape[1])
        ref = model(input_ids=torch.cat([batch.input_ids, ids], 1),
                    attention_mask=torch.cat([batch.attention_mask, mask.long()], 1),
                    position_ids=torch.cat([batch.position_ids, pos], 2),
                    mm_token_type_ids=torch.cat([batch.mm_token_type_ids, torch.zeros_like(ids)], 1),
                    pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw, labels=labels).loss
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the supervised tokens are exactly the target text followed by <|im_end|>
    n = int(mask[0].sum())
    assert proc.tokenizer.decode(ids[0, :n]) == records[0]["target"] + "<|im_end|>"
    assert (ids[0, n:] == proc.pad_token_id).all()


def test_tiny_model_overfits_eight_examples(squares, tmp_path):
    _, data, model_dir = squares
    out = str(tmp_path / "sft")
    sft.main(["--model", model_dir, "--data", data, "--out", out, "--batch_size", "8", "--micro_batch_size", "4",
              "--lr", "3e-3", "--max_steps", "80", "--warmup_ratio", "0.1", "--schedule", "constant",
              "--device", "cpu"])
    import json
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[0]["loss"] > 3.0 and log[-1]["loss"] < 0.05
    model, proc = vlm.load_model(os.path.join(out, "final")), vlm.Processor.from_pretrained(os.path.join(out, "final"))
    records = read_records(data)
    batch = proc.encode([r["image"] for r in records], [r["question"] for r in records])
    roll = engine.sample_completions(model, batch, max_new_tokens=24, greedy=True, eos_token_ids=proc.eos_token_ids,
                                  pad_token_id=proc.pad_token_id)
    assert proc.decode(roll.completion_ids, roll.completion_mask) == [r["target"] for r in records]


COMMON = ["--batch_size", "8", "--micro_batch_size", "2", "--lr", "1e-3", "--max_steps", "6", "--warmup_ratio",
          "0.3", "--device", "cpu", "--weight_decay", "0.1"]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # Qwen3-VL under FSDP2: tests/test_grpo.py
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(squares, tmp_path, mode):
    """gloo on CPU: DDP, and FSDP2 (sharded parameters, gradients and optimizer state)."""
    _, data, model_dir = squares
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sft.main(["--model", model_dir, "--data", data, "--out", one] + COMMON)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    flags = ["--fsdp", "--save_every", "3"] if mode == "fsdp" else []
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "sft.py"), "--model", model_dir, "--data", data, "--out", two] + COMMON + flags,
                   check=True, env=env, cwd=ROOT, capture_output=True)
    a, b = weights(os.path.join(one, "final")), weights(os.path.join(two, "final"))
    start = weights(model_dir)
    assert max((a[k] - start[k]).abs().max() for k in a) > 1e-3  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_stop_and_resume_equals_uninterrupted(squares, tmp_path, monkeypatch, lora):
    _, data, model_dir = squares
    extra = ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1"] if lora else []
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    sft.main(["--model", model_dir, "--data", data, "--out", straight, "--save_every", "2"] + COMMON + extra)

    calls = {"n": 0}
    real = trainer.clip_gradients

    def crash_at_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("preempted")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "clip_gradients", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        sft.main(["--model", model_dir, "--data", data, "--out", resumed, "--save_every", "2"] + COMMON + extra)
    monkeypatch.setattr(trainer, "clip_gradients", real)
    assert checkpoint.latest_checkpoint(resumed).endswith("step_000002")
    sft.main(["--model", model_dir, "--data", data, "--out", resumed, "--save_every", "2", "--resume"] + COMMON + extra)
    a, b = weights(os.path.join(straight, "final")), weights(os.path.join(resumed, "final"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json
    log_a = [json.loads(x) for x in open(os.path.join(straight, "log.jsonl"))]
    log_b = [json.loads(x) for x in open(os.path.join(resumed, "log.jsonl"))]
    # step 3 was logged before the crash, then run again from step 2's checkpoint: logged once
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]


def test_resume_with_other_settings_is_refused_naming_them(squares, tmp_path):
    """The saved optimizer and schedule would silently override a new --lr; a new --lora_r would not fit
    the saved adapter (an unrelated error deep in loading). Both are refused up front, each named."""
    _, data, model_dir = squares
    out = str(tmp_path / "o")
    run = lambda *extra: sft.main(["--model", model_dir, "--data", data, "--out", out] + COMMON + list(extra))
    run("--lora_r", "4", "--save_every", "2", "--max_steps", "2")
    with pytest.raises(SystemExit, match=r"--lr 0.001 then, 0.003 now"):
        run("--lora_r", "4", "--max_steps", "2", "--resume", "--lr", "3e-3")
    with pytest.raises(SystemExit, match=r"--lora_r 4 then, 8 now"):
        run("--lora_r", "8", "--max_steps", "2", "--resume")
    run("--lora_r", "4", "--max_steps", "2", "--resume", "--save_every", "1", "--micro_batch_size", "4")  # fine


def test_resume_compares_paths_as_paths(squares, tmp_path, monkeypatch):
    """The same run written differently resumes: --out with a trailing slash, paths relative to another
    directory, a run folder copied elsewhere (its own files named under the new --out). A real difference is
    still refused, naming the flag."""
    import shutil
    root, data, model_dir = squares
    os.makedirs(tmp_path / "elsewhere")
    shutil.copy(data, tmp_path / "runA.jsonl")  # any data file: not opened before the comparison fails
    monkeypatch.chdir(tmp_path)
    model, data = os.path.relpath(model_dir), os.path.relpath(data)

    def run(*flags):
        sft.main(COMMON + ["--max_steps", "2", "--save_every", "2", "--lora_r", "4", "--no_check_images"]
                 + list(flags))

    os.makedirs("runA")
    shutil.copy(os.path.join(root, "train.jsonl"), "runA/kept.jsonl")  # a file inside the run folder
    run("--model", model, "--data", data, "--val_data", "runA/kept.jsonl", "--out", "runA")
    run("--model", model, "--data", data, "--val_data", "runA/kept.jsonl", "--out", "runA/", "--resume")
    monkeypatch.chdir(tmp_path / "elsewhere")
    up = lambda p: os.path.join("..", p)
    run("--model", up(model), "--data", up(data), "--val_data", "../runA/kept.jsonl", "--out", "../runA", "--resume")
    shutil.copytree(tmp_path / "runA", tmp_path / "elsewhere" / "runB")
    run("--model", os.path.abspath(up(model)), "--data", up(data), "--val_data", "runB/kept.jsonl", "--out", "runB",
        "--resume")
    with pytest.raises(SystemExit, match=r"--lr 0.001 then, 0.003 now"):
        run("--model", up(model), "--data", up(data), "--val_data", "runB/kept.jsonl", "--out", "runB", "--resume",
            "--lr", "3e-3")
    with pytest.raises(SystemExit, match=r"--data \S*train.jsonl\S* then, \S*runA.jsonl\S* now"):
        run("--model", up(model), "--data", "../runA.jsonl", "--val_data", "runB/kept.jsonl", "--out", "runB",
            "--resume")


def test_labels_are_checked_against_the_class_table(squares, tmp_path):
    import json
    from data.records import RecordError, write_classes
    _, data, model_dir = squares
    labels = [r["label"] for r in read_records(data)]
    write_classes(str(tmp_path / "classes.json"), {"dataset": "toy", "domain": "shape", "classes": [
        {"id": i, "name": name, "aliases": [], "parents": []} for i, name in enumerate(labels[:-1])]})
    with pytest.raises(RecordError, match=rf"train.jsonl:8: unknown label {json.dumps(labels[-1])}".replace('"', "'")):
        sft.main(["--model", model_dir, "--data", data, "--out", str(tmp_path / "o"), "--classes",
                  str(tmp_path / "classes.json"), "--max_steps", "1", "--device", "cpu"])


def test_per_class_keeps_the_first_records_of_each_label(squares, tmp_path, capsys):
    _, data, model_dir = squares
    records = read_records(data)
    from data.records import write_records
    doubled = str(tmp_path / "doubled.jsonl")
    write_records(doubled, records + [dict(r, target=r["target"] + " again") for r in records])
    sft.main(["--model", model_dir, "--data", doubled, "--out", str(tmp_path / "o"), "--batch_size", "8",
              "--max_steps", "1", "--per_class", "1", "--device", "cpu"])
    assert "8 examples" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_a_checkpoint_saved_before_some_flags_existed_resumes(squares, tmp_path):
    """An older version saved no --report_to, --prompt or --class_list: at their defaults the run is the same
    one and --resume continues it (it was refused with one "(not set) then" line per flag); a value other than
    the default is still refused by name."""
    _, data, model_dir = squares
    out = str(tmp_path / "run")
    flags = ["--model", model_dir, "--data", data, "--out", out, "--save_every", "2", "--batch_size", "8",
             "--micro_batch_size", "2", "--lr", "1e-3", "--max_steps", "2", "--device", "cpu"]
    sft.main(flags)
    state = os.path.join(out, "final", "train_state.json")  # the newest checkpoint, which --resume takes
    with open(state) as f:
        saved = json.load(f)
    for flag in ("report_to", "prompt", "class_list"):
        del saved["extra"]["args"][flag]
    with open(state, "w") as f:
        json.dump(saved, f)
    with pytest.raises(SystemExit, match=r"--prompt \(not set: the checkpoint predates it, so its default auto\) "
                                         r"then, open now"):
        sft.main(flags + ["--resume", "--prompt", "open"])
    sft.main(flags + ["--resume"])
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))
