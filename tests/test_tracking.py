"""--report_to: the rows W&B (offline) and TensorBoard record, read back from their files, equal the rows of
log.jsonl (and evaluate.py's metrics); a backend whose package is missing is refused at parsing."""
import glob
import importlib.util
import json
import os
import struct
from collections import defaultdict

import numpy as np
import pytest

import evaluate
import grpo
import sft
import vlm
from common import Dist, JsonlLog, read_jsonl
from test_mine_topk import fake_decode, make_world

FLAGS = {"model": "m", "lr": 1e-3, "data": ["a.jsonl"], "max_steps": 3, "classes": None}
ROWS = [{"step": 1, "loss": 2.5, "lr": 1e-3, "tokens": 120, "skipped": False},
        {"step": 2, "loss": 1.25, "lr": 1e-3, "tokens": 96, "skipped": True, "note": "warm",
         "val_loss": None},
        {"step": 3, "loss": float("nan"), "lr": 5e-4, "tokens": 0, "grad_norm": float("inf")}]


def numbers(row, prefix=""):
    """What a tracker gets of a row: its numbers but the step, bools as 0/1, nested dicts as "a/b" keys."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and k != "step":
            out[prefix + k] = float(v)
    return out


def assert_same_rows(got, want, float32=False):
    """{step: {key: value}} equal, NaN included; TensorBoard keeps scalars as float32."""
    assert sorted(got) == sorted(want)
    for step, values in want.items():
        expected = {k: float(np.float32(v)) for k, v in values.items()} if float32 else values
        assert got[step] == pytest.approx(expected, rel=0, abs=0, nan_ok=True), step


# ----------------------------------------------------------------------------------------------------
# reading back what each tracker wrote

def wandb_records(path):
    """The records of a W&B transaction log (run-<id>.wandb; wandb no longer ships a Python reader): a
    7-byte file header, then leveldb-log chunks in 32 KiB blocks, each a 7-byte header (crc32c, length,
    type: 1 full, 2 first, 3 middle, 4 last) and its bytes; a block's tail too short for a header is
    padding."""
    from wandb.proto.wandb_internal_pb2 import Record
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, record = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        record += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            yield Record.FromString(record)
            record = b""


def wandb_runs(folder):
    """Each W&B run logged under folder/wandb, oldest first: {"id", "project", "name", "config", "rows"}."""
    runs = []
    paths = glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))
    for path in sorted(paths, key=os.path.getmtime):
        run = {"rows": defaultdict(dict)}
        for r in wandb_records(path):
            if r.HasField("run"):
                config = {u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"}
                run.update(id=r.run.run_id, project=r.run.project, name=r.run.display_name, config=config)
            if r.HasField("history"):  # "_step", "_runtime", "_timestamp": W&B's own
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                run["rows"][r.history.step.num].update({k: v for k, v in items.items() if k[0] != "_"})
        runs.append(run)
    return runs


def tensorboard_run(folder):
    """What TensorBoard shows of folder/tensorboard (purged steps hidden): {"config", "rows"}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(folder, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = defaultdict(dict)
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            rows[event.step][tag] = event.value
    configs = [json.loads(e.tensor_proto.string_val[0]) for e in acc.Tensors("config/text_summary")]
    return {"config": configs[-1], "rows": rows}


def read_back(backend, folder):
    return wandb_runs(folder)[-1] if backend == "wandb" else tensorboard_run(folder)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline with all its files under tmp_path: no network, nothing in ~/.config or ~/.cache."""
    wandb = pytest.importorskip("wandb", reason="the W&B tests need the optional package: pip install wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leaves pytest's capture of stdout alone
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    for key in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME",
                "WANDB_NAME"):
        monkeypatch.delenv(key, raising=False)
    yield
    wandb.teardown()  # the next test's wandb.init reads its own environment


@pytest.fixture(params=["wandb", "tensorboard"])
def backend(request):
    if request.param == "wandb":
        request.getfixturevalue("offline_wandb")
    else:
        pytest.importorskip("tensorboard",
                            reason="the TensorBoard tests need the optional package: pip install tensorboard")
    return request.param


# ----------------------------------------------------------------------------------------------------
# JsonlLog

def test_rows_reach_the_tracker_as_numbers_at_their_steps_and_a_resume_goes_on(backend, tmp_path):
    folder = str(tmp_path / "run")
    path = os.path.join(folder, "log.jsonl")
    os.makedirs(folder)
    log = JsonlLog(path, Dist(), report_to=backend, config=FLAGS)
    for row in ROWS:
        log.write(row)
    log.close()
    run = read_back(backend, folder)
    assert run["config"] == FLAGS
    want = {row["step"]: numbers(row) for row in ROWS}
    assert_same_rows(run["rows"], want, float32=backend == "tensorboard")
    assert numbers(ROWS[1]) == {"loss": 1.25, "lr": 1e-3, "tokens": 96, "skipped": 1}  # no note, no val_loss

    # resumed from step 2: step 3 is logged again; log.jsonl drops its old row, TensorBoard hides it, and
    # the W&B run goes on under the same id (W&B ignores steps it has: a resume reruns them exactly)
    again = [dict(ROWS[2], loss=0.5), {"step": 4, "loss": 0.25}]
    log = JsonlLog(path, Dist(), start_step=2, report_to=backend, config=FLAGS)
    for row in again:
        log.write(row)
    log.close()
    rows = read_jsonl(path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and rows[2]["loss"] == 0.5
    if backend == "wandb":
        first, resumed = wandb_runs(folder)
        assert (first["id"], first["project"], first["name"]) == (resumed["id"], "fgrl", "run")
        assert_same_rows(resumed["rows"], {row["step"]: numbers(row) for row in again})
    else:
        want = {row["step"]: numbers(row) for row in rows}
        assert_same_rows(tensorboard_run(folder)["rows"], want, float32=True)

    # a new run in the folder (step 0) is a new W&B run
    JsonlLog(path, Dist(), report_to=backend, config=FLAGS).close()
    if backend == "wandb":
        assert len({run["id"] for run in wandb_runs(folder)}) == 2


def test_no_tracker_and_only_rank_0_logs(tmp_path):
    """report_to none, and ranks other than 0, never touch a tracker (nothing imported, no folder written)."""
    path = str(tmp_path / "log.jsonl")
    for log in (JsonlLog(path, Dist()), JsonlLog(path, Dist(rank=1, world_size=2), report_to="tensorboard")):
        log.write(ROWS[0])
        log.close()
    assert read_jsonl(path) == [ROWS[0]] and os.listdir(tmp_path) == ["log.jsonl"]


# ----------------------------------------------------------------------------------------------------
# the flag

@pytest.mark.parametrize("script", [sft, evaluate, grpo])
@pytest.mark.parametrize("package", ["wandb", "tensorboard"])
def test_a_missing_package_is_refused_at_parsing_naming_it(script, package, monkeypatch, capsys):
    """Whether or not the package is installed here: find_spec is made to miss it (nothing is imported)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--model", "m", "--data", "d", "--out", "o", "--report_to", package])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--report_to: needs the {package} package" in err and f"pip install {package}" in err
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--model", "m", "--data", "d", "--out", "o", "--report_to", "mlflow"])
    assert e.value.code == 2 and "invalid choice: 'mlflow'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# the scripts, end to end on tiny models

def assert_tracker_has_the_log(backend, out, argv, parse_args):
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    run = read_back(backend, out)
    want = {row["step"]: numbers(row) for row in rows}
    assert_same_rows(run["rows"], want, float32=backend == "tensorboard")
    assert run["config"] == json.loads(json.dumps(vars(parse_args(argv))))


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # logging is the same for every model
def test_sft_logs_its_rows_live(backend, squares, tmp_path):
    _, data, model_dir = squares
    out = str(tmp_path / "sft")
    argv = ["--model", model_dir, "--data", data, "--val_data", data, "--out", out, "--batch_size", "4",
            "--micro_batch_size", "4", "--max_steps", "3", "--device", "cpu", "--report_to", backend]
    sft.main(argv)
    assert "val_loss" in read_jsonl(os.path.join(out, "log.jsonl"))[-1]  # rows with different keys
    assert_tracker_has_the_log(backend, out, argv, sft.parse_args)


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_grpo_logs_its_rows_live(backend, small_world, tmp_path):
    root, model = small_world
    out = str(tmp_path / "grpo")
    argv = ["--model", model, "--classes", str(root / "classes.json"), "--data", str(root / "mcq.jsonl"),
            "--out", out, "--device", "cpu", "--max_steps", "2", "--prompts_per_step", "4",
            "--num_samples", "4", "--max_new_tokens", "16", "--micro_batch_size", "8",
            "--reward", "mcq+format", "--report_to", backend]
    grpo.main(argv)
    assert_tracker_has_the_log(backend, out, argv, grpo.parse_args)


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_evaluate_logs_each_modes_metrics(backend, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(vlm.Processor, "decode", fake_decode)
    world = make_world(tmp_path / "world", n_train=3, corrupt=False)
    out = str(tmp_path / "eval")
    argv = ["--model", tiny_dir, "--data", os.path.join(world, "test_base.jsonl"),
            os.path.join(world, "test_novel.jsonl"), "--classes", os.path.join(world, "classes.json"),
            "--out", out, "--mode", "open", "mcq", "--max_new_tokens", "6", "--report_to", backend]
    evaluate.main(argv)
    metrics = {mode: json.load(open(os.path.join(out, f"metrics_{mode}.json"))) for mode in ("open", "mcq")}
    want = numbers(metrics)
    assert "open/mean/acc" in want and "mcq/per_dataset/toy/acc" in want
    run = read_back(backend, out)
    assert_same_rows(run["rows"], {0: want}, float32=backend == "tensorboard")
    assert run["config"] == json.loads(json.dumps(vars(evaluate.parse_args(argv))))
