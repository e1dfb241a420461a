"""common.py — what every script shares besides the model: torchrun, printing, seeds, JSONL, resumable passes.

The same code runs under `torchrun` (one process per GPU, or gloo processes on a CPU) and plain `python`:
`init_distributed` reads torchrun's environment, `print0` prints once, `all_reduce_sum` is a no-op alone.
"""

import argparse
import importlib.util
import json
import math
import numbers
import os
import random
import sys
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from PIL import Image

from data.prompts import LETTERS
from data.records import IMAGE_KEYS, atomic_write


# ----------------------------------------------------------------------------------------------------
# the command line: one name per concept, the same defaults in every script

def add_runtime_args(ap):
    """--device, --dtype, --seed: the same names, choices and defaults in every script."""
    ap.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 on GPUs, fp32 on CPUs. Training keeps fp32 master weights either way")
    ap.add_argument("--seed", type=int, default=0, help="every random choice of the run derives from it")


def flag_defaults(ap):
    """{flag's dest: its default}: what a run that never set a flag ran with (a resume of an older checkpoint)."""
    return {a.dest: a.default for a in ap._actions if a.dest != "help"}


def renamed(ap, old, new):
    """Refuse a former spelling of a flag by name, saying what replaced it (hidden from --help)."""
    class Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{old} is now {new}")
    ap.add_argument(old, action=Refuse, nargs="?", help=argparse.SUPPRESS)


def add_sampling_args(ap, *, num_samples, prompts_per_call, max_new_tokens, top_p=1.0):
    """The sampler's flags, the same in every script that samples (engine.sample_completions)."""
    a = ap.add_argument
    a("--num_samples", type=positive_int, default=num_samples,
      help="samples per prompt (GRPO's group size G; the N answers of mining and two-step inference)")
    a("--prompts_per_call", type=positive_int, default=prompts_per_call,
      help="prompts per sampler call on one rank: memory and speed. Each call has its own seed, so with 1 the "
           "samples do not depend on the number of ranks")
    a("--max_new_tokens", type=positive_int, default=max_new_tokens, help="completion length limit in tokens")
    a("--temperature", type=positive_float, default=1.0, help="sampling temperature T")
    a("--top_p", type=probability, default=top_p, help="nucleus sampling mass")
    a("--decode", default="eager", choices=["eager", "static", "compiled"],
      help="decode step: eager (the KV buffer step, the reference), static (one shape per bucket, checks "
           "for the end every 16 tokens, a random stream per row) or compiled (static under torch.compile; "
           "CUDA graphs on CUDA)")


def add_image_args(ap):
    """--min_pixels, --max_pixels: default None keeps what the checkpoint's preprocessor config says."""
    ap.add_argument("--min_pixels", type=positive_int, default=None,
                    help="smallest image area in pixels after resizing (default: the checkpoint's own)")
    ap.add_argument("--max_pixels", type=positive_int, default=None,
                    help="largest image area in pixels after resizing, i.e. at most max_pixels / 28² visual "
                         "tokens for Qwen2.5-VL, / 32² for Qwen3-VL (default: the checkpoint's own; DiVE-k uses "
                         "401408: 512 tokens of Qwen2.5-VL)")


def _bounded(kind, ok, rule):
    """An argparse type: `kind(text)`, refused with the rule when `ok` says no (the flag is named by argparse)."""
    def parse(text):
        value = kind(text)
        if kind is float and not math.isfinite(value):  # an inf or NaN rate, weight or clip makes no run
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


positive_int = _bounded(int, lambda v: v >= 1, "at least 1")
nonnegative_int = _bounded(int, lambda v: v >= 0, "0 or more")
positive_float = _bounded(float, lambda v: v > 0, "more than 0")
nonnegative_float = _bounded(float, lambda v: v >= 0, "0 or more")
fraction = _bounded(float, lambda v: 0 <= v < 1, "in [0, 1)")
unit_interval = _bounded(float, lambda v: 0 <= v <= 1, "in [0, 1]")
probability = _bounded(float, lambda v: 0 < v <= 1, "in (0, 1]")
option_count = _bounded(int, lambda v: 2 <= v <= len(LETTERS), f"2 to {len(LETTERS)} (options are lettered A-Z)")


LARGE_IMAGE_TOKENS = 4096  # visual tokens of one image past which memory, not the model, is what a user meets


def warn_large_images(records, processor):
    """One warning line, before any work, when images of `records` become more than LARGE_IMAGE_TOKENS visual
    tokens each at the processor's bounds (a Hub checkpoint allows 16,384): the largest, its count and the
    flag to set, instead of an out-of-memory error later. Reads image headers only.

    An image over PIL's decompression-bomb limit does not open at all: one more line names it (its record's
    file:line and path) and how many there are. Like every image that does not load, data.records.load_image
    refuses it where the stage loads it, and the stage skips and counts it (an evaluation's `skipped` row)."""
    large, bombs = [], []
    srcs = {}  # image path -> the first record naming it
    for r in records:
        for key in IMAGE_KEYS:
            if r.get(key):
                srcs.setdefault(r[key], r.get("_src", "?"))
    for path, src in srcs.items():
        try:
            with Image.open(path) as image:
                w, h = image.size
            n = processor.image_processor.get_number_of_image_patches(h, w) // processor.merge_size ** 2
        except Image.DecompressionBombError as e:  # an Exception, not an OSError: caught by name
            bombs.append(f"{src}: {path}: {e}")
            continue
        except (OSError, SyntaxError, ValueError):  # unreadable or too elongated: named where loaded
            continue
        if n > LARGE_IMAGE_TOKENS:
            large.append((n, path, w, h))
    if bombs:
        print0(f"warning: {len(bombs)} image(s) over PIL's decompression-bomb limit will not load and are "
               f"skipped like any image that does not load; the first: {bombs[0]}")
    if large:
        n, path, w, h = max(large)
        print0(f"warning: {len(large)} image(s) over {LARGE_IMAGE_TOKENS} visual tokens at --max_pixels "
               f"{processor.pixel_bounds[1]}, the largest {path} ({w}x{h}) {n} visual tokens: memory grows with "
               f"them; set --max_pixels (e.g. {512 * processor.token_pixels}, at most 512 tokens)")


# ----------------------------------------------------------------------------------------------------
# torchrun

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(device="auto"):
    """The torch.device --device names; a device this machine does not have is refused here, naming the flag,
    rather than by an assertion deep inside the first .to(device)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise SystemExit(f"--device {device}: CUDA is not available ({why}); use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: there are {torch.cuda.device_count()} GPU(s), numbered from 0")
    return dev


def resolve_dtype(name, device="cpu"):
    """'auto' is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        name = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16}[name]


def init_distributed(device="auto"):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist(device=resolve_device(device))
    use_cuda = resolve_device(device).type == "cuda"
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local, dev)


def cleanup():
    """Wait for every rank, then tear the process group down (a no-op without torchrun)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values, device="cpu"):
    """Sum a list of floats over ranks (a no-op without torch.distributed). Returns a list of floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def shard(items, d):
    """This rank's share of a list: every world_size-th item starting at its rank."""
    return items[d.rank::d.world_size]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def progress(start, total, d, desc):
    """A progress bar on rank 0; redrawn every 30 s instead of every second when output goes to a file."""
    from tqdm import tqdm
    return tqdm(range(start, total), initial=start, total=total, disable=not d.is_main, desc=desc,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


# ----------------------------------------------------------------------------------------------------
# seeds

def seed_of(*parts):
    """A 63-bit seed from any values, the same in every process and on every machine (unlike hash()).

    The one seeding rule: every random choice is drawn from a generator seeded by what it is about,
    e.g. ("rollout", seed, item index), never by the rank or by how many draws came before, so a run
    gives the same samples on 1 or N processes and after a resume."""
    return random.Random("-".join(map(str, parts))).getrandbits(63)


def rng_of(*parts):
    """A Python random.Random seeded by `seed_of(*parts)`."""
    return random.Random(seed_of(*parts))


def generator_of(*parts, device="cpu"):
    """A torch.Generator seeded by `seed_of(*parts)`."""
    return torch.Generator(device=device).manual_seed(seed_of(*parts))


def epoch_permutation(n, seed, epoch):
    """The order of n items in epoch `epoch`: a permutation that depends on (seed, epoch) only."""
    return torch.randperm(n, generator=generator_of("epoch", seed, epoch)).tolist()


def class_balanced_permutation(labels, seed, epoch):
    """The order of items labelled `labels` in epoch `epoch`, each class spread evenly over it: a class of n
    items puts its k-th (in a seeded shuffle) at a random point of the k-th n-th of the epoch. With classes
    of equal size the epoch is rounds that each hold every class once, in a random order; a run of as many
    items as there are classes holds each class about once. Depends on (seed, epoch) only."""
    g = generator_of("epoch", seed, epoch)
    members = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    jitter = torch.rand(len(labels), generator=g).tolist()
    key = [0.0] * len(labels)
    for idx in members.values():
        for k, j in enumerate(torch.randperm(len(idx), generator=g).tolist()):
            key[idx[j]] = (k + jitter[idx[j]]) / len(idx)
    return sorted(range(len(labels)), key=key.__getitem__)


def seed_process(seed, rank=0):
    """The process-wide generators (torch's and Python's), for what is drawn in sequence rather than per
    item: LoRA's initial weights, dropout. Per rank, so ranks do not drop out the same units."""
    torch.manual_seed(seed_of("process", seed, rank))
    random.seed(seed_of("python", seed, rank))


# ----------------------------------------------------------------------------------------------------
# JSONL

def read_jsonl(path):
    """The rows of a JSONL file the codebase wrote (logs, predictions, shards). A line that does not
    parse is the one a crash cut short and is skipped; user data goes through data.records instead,
    which names the file and line of every bad record."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def write_jsonl(path, rows):
    """All rows at once, atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def append_jsonl(path, rows):
    """Append rows and fsync: they survive a crash right after this returns. The lines go out in one write;
    one that a crash or a full disk cuts short is the file's last, which `drop_cut_line` removes before the
    next append."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def drop_cut_line(path):
    """Cut a JSONL file we append to back to its last complete line. What follows the last newline is a line
    a crash or a full disk cut short: appending after it would glue the next line onto it, and the reader
    would then skip both. A line without its newline counts as cut even when it parses: it is redone."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":  # only after a crash: reading the whole file once is fine then
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)


# --report_to: each backend is also the package it needs, an optional extra
TRACKERS = ("wandb", "tensorboard")


def add_report_args(ap):
    """--report_to. A backend whose package is missing is refused here, before any work, not at the end of
    the first step."""
    def backend(name):
        if name in TRACKERS and importlib.util.find_spec(name) is None:  # looked up, not imported: fast
            raise argparse.ArgumentTypeError(f"needs the {name} package (optional): pip install {name}")
        return name  # an unknown name is refused by `choices`
    ap.add_argument("--report_to", default="none", choices=("none",) + TRACKERS, type=backend,
                    help="also log the rows of log.jsonl (evaluate.py: the metrics) live to Weights & Biases "
                         "or TensorBoard (OUT/tensorboard), with the run's flags as its config. Optional "
                         "extras: pip install wandb / pip install tensorboard")


class Tracker:
    """The numbers of a run's rows, live in W&B or TensorBoard as --report_to says ("none": nothing); rank 0
    makes one. W&B writes under `folder`/wandb (WANDB_PROJECT, default fgrl; WANDB_MODE=offline needs no
    network and `wandb sync` uploads later), TensorBoard to `folder`/tensorboard.

    `first_step` is the step this run logs first. As JsonlLog drops the rows of later steps, TensorBoard hides
    what earlier runs in the folder logged from that step on; a run that starts after step 1 resumes a
    training run and continues the folder's W&B run (its id is kept in `folder`/wandb_run_id)."""

    def __init__(self, report_to, folder, config=None, name=None, first_step=0):
        self.run = self.writer = None
        if report_to == "wandb":
            import wandb
            id_file = os.path.join(folder, "wandb_run_id")
            if first_step > 1 and os.path.exists(id_file):
                with open(id_file, encoding="utf-8") as f:
                    run_id = f.read()
            else:
                run_id = uuid.uuid4().hex[:8]
                atomic_write(id_file, run_id)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fgrl"), dir=folder, config=config,
                                  name=name or os.path.basename(os.path.normpath(folder)), id=run_id,
                                  resume="allow")
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(folder, "tensorboard"), purge_step=first_step)
            self.writer.add_text("config", json.dumps(config))

    def log(self, row):
        """The numbers of `row` (bools as 0/1; nested dicts as "open/mean/hm" keys) at its "step" (none, as in
        evaluate.py's metrics: step 0). Strings and None stay in the JSON files only."""
        step = row.get("step", 0)
        values = {k: int(v) if isinstance(v, bool) else v for k, v in _flat(row).items()
                  if isinstance(v, numbers.Real) and k != "step"}
        if self.run:
            self.run.log(values, step=step)
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()  # on disk now: a crash later loses no row

    def close(self):
        """Everything logged is on disk when this returns."""
        if self.run:
            import wandb
            self.run.finish()
            wandb.teardown()  # finish() may return before wandb's service process has written the last rows
        if self.writer:
            self.writer.close()


def _flat(d, prefix=""):
    """{"open": {"mean": {"hm": x}}} -> {"open/mean/hm": x}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


class JsonlLog:
    """Training metrics, one JSON line per step (rank 0 only), on disk as soon as they are written, and live
    in W&B or TensorBoard with `report_to` (Tracker; `config`: the run's flags). `close()` at the end.

    A run that starts at `start_step` (0, or the step it resumed from) first drops the rows of later steps
    a previous run left (logged after its last checkpoint, or a whole earlier run in the same folder): the
    steps it is about to run are logged once."""

    def __init__(self, path, d, start_step=0, report_to="none", config=None, name=None):
        self.path = path if d.is_main else None
        if self.path and os.path.exists(path):
            drop_cut_line(path)
            rows = read_jsonl(path)
            kept = [row for row in rows if row.get("step", 0) <= start_step]
            if len(kept) < len(rows):
                write_jsonl(path, kept)
        self.tracker = Tracker(report_to if d.is_main else "none", os.path.dirname(os.path.abspath(path)),
                               config, name, first_step=start_step + 1)

    def write(self, row):
        if self.path:
            append_jsonl(self.path, [row])
            self.tracker.log(row)

    def close(self):
        """Finish the W&B run, close the TensorBoard writer (log.jsonl needs nothing)."""
        self.tracker.close()


# the flags that name files, in every script: two runs are compared on the files they name (as_file)
PATH_FLAGS = ("model", "data", "val_data", "mcq_data", "classes", "confusions", "verifier_model", "out")


def as_file(value):
    """The file a path flag names, for comparing two runs: absolute, with '..', symlinks and a trailing slash
    resolved (out/x/final/ and ../x/final from another folder are one model). A value that names nothing
    here (a Hub id, a file since moved) stays as typed, normalised."""
    return os.path.realpath(value) if os.path.exists(value) else os.path.normpath(value)


def map_path_flags(settings, change):
    """The settings with `change` applied to each path flag's value (a path, or a list of them)."""
    def one(value):
        return [change(v) for v in value] if isinstance(value, list) else change(value)
    return {k: one(v) if k in PATH_FLAGS and v is not None else v for k, v in settings.items()}


def run_flags(settings, neutral=()):
    """Flags as a run saves them to compare with a later run's (a training checkpoint's --resume, the shards
    of mining and evaluation): JSON values (lists, not tuples), the path flags as the files they name,
    without the `neutral` ones. `settings`: parsed args or a dict."""
    settings = vars(settings) if isinstance(settings, argparse.Namespace) else settings
    kept = json.loads(json.dumps({k: v for k, v in settings.items() if k not in neutral}))
    return map_path_flags(kept, as_file)


class ResumableShards:
    """Results of a (data-parallel) pass over a list of items, kept safe as they are produced.

    Each rank appends each finished batch to `{path}.shard{rank}of{world}.jsonl` as one line
    `{"rows": [...]}` (fsynced), every row carrying `"key"`: its item's index. A rerun first cuts its own
    shard back to its last complete line (`drop_cut_line`: a crash or a full disk may have cut the last one
    short), reads every shard file present (whatever world size wrote it) and skips finished keys, so an
    interrupted evaluation or mining run resumes where it stopped. A batch is saved whole or not at all, so
    the rerun redoes a cut batch whole, batched (and seeded) as an uninterrupted run, which gives the same
    bytes. `merge()` (all ranks call it; rank 0 writes) puts the rows in key order into `path`, atomically,
    and removes the shards.

    `flags` (from `run_flags`: the flags that shape a row) are saved to `{path}.flags.json` before the first
    row; a rerun whose flags differ from those of the rows saved so far would mix two runs in one output, so
    it is refused, naming each flag, with the advice to rerun with the same flags or to start over: another
    --out, or delete `start_over` (default: this pass's own files, `{path}.*`). All ranks construct it.
    """

    def __init__(self, path, d, flags=None, start_over=None):
        self.path, self.d = path, d
        folder, base = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if d.is_main:  # left by a kill between atomic_write's write and its rename: never renamed, never read
            for name in os.listdir(folder):
                if name.startswith(base + ".") and name.endswith(".partial-tmp"):
                    os.remove(os.path.join(folder, name))
        self.mine = f"{path}.shard{d.rank}of{d.world_size}.jsonl"
        drop_cut_line(self.mine)  # only its own: another rank may be appending to its shard right now
        self.rows = self._saved_rows()
        self.done = {row["key"] for row in self.rows}
        self.flags_path = f"{path}.flags.json"
        if flags is not None:
            self._save_or_compare(flags, start_over or f"{path}.*")

    def _save_or_compare(self, flags, start_over):
        if self.rows and os.path.exists(self.flags_path):
            with open(self.flags_path, encoding="utf-8") as f:
                then = json.load(f)
            unset = "(not set)"
            diff = [k for k in sorted(set(then) | set(flags)) if then.get(k, unset) != flags.get(k, unset)]
            if diff:
                said = "; ".join(f"--{k}: {then.get(k, unset)} then, {flags.get(k, unset)} now" for k in diff)
                raise SystemExit(f"{self.path}: the {len(self.done)} rows saved so far (an unfinished run) "
                                 f"were made with other flags: {said}. Rerun with the same flags to finish "
                                 f"that run; to start over instead, use another --out or delete {start_over}")
        elif self.d.is_main:  # no rows to mix with (or rows of a version that saved no flags): this run's
            atomic_write(self.flags_path, json.dumps(flags, ensure_ascii=False, indent=1) + "\n")
        barrier()  # saved before any rank appends a row

    def _shard_files(self):
        folder, base = os.path.split(os.path.abspath(self.path))
        return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
                if name.startswith(base + ".shard") and name.endswith(".jsonl")]

    def _saved_rows(self):
        # a line is a batch {"rows": [...]}; a line that is a row itself was written by an older version
        return [row for p in self._shard_files() for line in read_jsonl(p) for row in line.get("rows", [line])]

    def append(self, rows):
        """Save one batch's rows as one line."""
        append_jsonl(self.mine, [{"rows": rows}])
        self.done.update(row["key"] for row in rows)

    def merge(self):
        """All rows, one per key in key order; rank 0 writes them to `path`. Returns the rows."""
        barrier()
        by_key = {row["key"]: row for row in self._saved_rows()}
        rows = [by_key[k] for k in sorted(by_key)]
        if self.d.is_main:
            write_jsonl(self.path, rows)
        barrier()
        if self.d.is_main:
            for p in self._shard_files():
                os.remove(p)
            if os.path.exists(self.flags_path):  # last: flags that a kill leaves without rows are replaced
                os.remove(self.flags_path)
        barrier()
        return rows
