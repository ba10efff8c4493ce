"""Train the paper's CapsNet on MNIST: ``python -m capstriton.train`` or ``capstriton-train``.

    capstriton-train --data-dir data/mnist --epochs 50 --out runs/capsnet      # the paper's model
    capstriton-train --data-dir data/mnist --holdout 1000 --conv-channels 64 \\
        --primary-types 8 --decoder-hidden none --epochs 3                    # test files only
    torchrun --nproc_per_node 4 -m capstriton.train --data-dir data/mnist      # DDP, 4 GPUs

Adam with an exponentially decaying learning rate (per epoch), margin loss plus 0.0005 x the
per-image sum of squared reconstruction errors, random shifts of up to 2 pixels. Each epoch logs
loss, accuracy and throughput, evaluates, then writes into ``--out``: ``checkpoint.pt`` (model,
optimizer, scheduler, grad scaler, epoch, history, options) and ``metrics.json``, each replaced
atomically; at the end ``training_curves.png`` and ``reconstructions.png``.

A non-finite loss (training or test) or parameter stops the run with an error naming the epoch
(and step) before anything of that epoch is saved: the last checkpoint stays the last good one.
A checkpoint carries a sha256 digest of its content, checked on ``--resume``, so a damaged file
is an error naming it rather than a silently different model. ``--resume`` continues with the
options that shape the trajectory (:data:`TRAJECTORY_OPTIONS`) taken from the checkpoint.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU). ``--batch-size`` is the *global* batch:
every rank draws the same shuffled order and shifts and takes its slice of each global batch,
and each rank's mean loss is weighted by its share of the batch, so the averaged gradient is
the gradient of the global batch's mean loss: a run on W processes follows the single-process
run up to floating-point reduction order. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import secrets
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist

from . import __version__, data
from ._checks import triton_unavailable_reason
from .models import CapsNet
from .nn import CapsuleLoss, capsule_lengths

__all__ = ["SetupError", "CheckpointError", "TrainingError", "build_parser", "parse_args", "run", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVES = "training_curves.png"
RECONSTRUCTIONS = "reconstructions.png"
#: The checkpoint's "format" entry: what tells a capstriton-train checkpoint from other torch files.
CHECKPOINT_FORMAT = "capstriton-train-checkpoint"
_CHECKPOINT_KEYS = frozenset(
    {"format", "version", "epoch", "model", "optimizer", "scheduler", "scaler", "history", "args"}
)
# The options that fix the model's shapes: a checkpoint resumes only with the same ones.
MODEL_OPTIONS = (
    "conv_channels",
    "primary_types",
    "primary_dim",
    "out_dim",
    "iterations",
    "decoder_hidden",
    "detach_routing",
)
#: The options that shape the training trajectory, with their defaults for a new run. A resumed
#: run takes them from its checkpoint; giving one with another value than the checkpoint's is an
#: error.
TRAJECTORY_OPTIONS = {
    "lr": 1e-3,
    "lr_decay": 0.96,
    "batch_size": 128,
    "seed": 0,
    "dtype": "float32",
    "no_augment": False,
    "reconstruction_weight": 0.0005,
    "holdout": None,
    "limit_train": None,
    "conv_channels": 256,
    "primary_types": 32,
    "primary_dim": 8,
    "out_dim": 16,
    "iterations": 3,
    "decoder_hidden": (512, 1024),
    "detach_routing": False,
}
#: The paper's augmentation: random shifts of up to 2 pixels in each direction.
MAX_SHIFT = 2
#: Training records a non-finite loss on the device every step but looks at that record (which
#: waits for the device) only every this many steps and at the end of the epoch.
FINITE_CHECK_EVERY = 32
_NO_STEP = torch.iinfo(torch.int64).max


class _Omitted:
    """The argparse default of :data:`TRAJECTORY_OPTIONS`, to tell an omitted option from a given
    one (None cannot: it is a value of --decoder-hidden, --holdout and --limit-train)."""

    def __repr__(self) -> str:
        return "OMITTED"


OMITTED = _Omitted()


class SetupError(ValueError):
    """An option that contradicts the data, the checkpoint or the process group."""


class CheckpointError(SetupError):
    """A ``--resume`` checkpoint that is damaged, truncated or not written by capstriton-train."""


class TrainingError(RuntimeError):
    """Training cannot go on: a loss or a parameter became non-finite."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {value}")
    return value


def _decay(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a factor in (0, 1], got {value}")
    return value


def _hidden_sizes(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() == "none":
        return None
    try:
        sizes = tuple(_positive_int(t) for t in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive layer sizes (e.g. 512,1024) or 'none', got {text!r}"
        ) from None
    return sizes


def _show(value: object) -> str:
    """An option's value as the command line spells it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # The trajectory options' argparse default is OMITTED: show their default for a new run instead.
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest in TRAJECTORY_OPTIONS:
            default = _show(TRAJECTORY_OPTIONS[action.dest]).replace("%", "%%")
            return f"{action.help or ''} (default: {default}; with --resume: the checkpoint's)".lstrip()
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line. The options of :data:`TRAJECTORY_OPTIONS` parse to :data:`OMITTED` when
    omitted: :func:`parse_args` fills in their defaults (or :func:`run`, when resuming, the
    checkpoint's)."""
    p = argparse.ArgumentParser(
        prog="capstriton-train",
        description="Train a CapsNet (Sabour et al. 2017) on MNIST, evaluate it on the test set.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/mnist", help="directory of the MNIST IDX .gz files")
    g.add_argument("--no-download", action="store_true", help="fail instead of downloading missing files")
    g.add_argument(
        "--holdout",
        type=_positive_int,
        default=OMITTED,
        metavar="N",
        help="train on all test images but the last N and evaluate on those N (needs only the test files)",
    )
    g.add_argument("--limit-train", type=_positive_int, default=OMITTED, metavar="N", help="train on the first N")
    g.add_argument("--limit-test", type=_positive_int, default=None, metavar="N", help="evaluate on the first N")
    g.add_argument("--no-augment", action="store_true", default=OMITTED, help="no random shifts of up to 2 pixels")

    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs", type=_positive_int, default=10, help="epochs in all (with --resume: more than the checkpoint's)"
    )
    g.add_argument("--batch-size", type=_positive_int, default=OMITTED, help="global batch (over all processes)")
    g.add_argument("--lr", type=_positive_float, default=OMITTED, help="initial learning rate")
    g.add_argument("--lr-decay", type=_decay, default=OMITTED, help="learning-rate factor per epoch")
    g.add_argument("--reconstruction-weight", type=float, default=OMITTED, help="weight of the sum of squares")
    g.add_argument("--seed", type=_seed, default=OMITTED, help="seeds the initial weights, shuffles and shifts")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=OMITTED, help="autocast dtype")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="routing implementation: auto is triton on CUDA, torch on CPU",
    )

    g = p.add_argument_group("model (defaults: the paper's)")
    g.add_argument("--iterations", type=_positive_int, default=OMITTED, help="routing iterations")
    g.add_argument("--conv-channels", type=_positive_int, default=OMITTED, help="channels of the first convolution")
    g.add_argument("--primary-types", type=_positive_int, default=OMITTED, help="primary capsule types")
    g.add_argument("--primary-dim", type=_positive_int, default=OMITTED, help="primary capsule dimension")
    g.add_argument("--out-dim", type=_positive_int, default=OMITTED, help="class capsule dimension")
    g.add_argument(
        "--decoder-hidden",
        type=_hidden_sizes,
        default=OMITTED,
        metavar="SIZES",
        help="decoder hidden layers, comma-separated, or 'none' for no decoder",
    )
    g.add_argument(
        "--detach-routing",
        action="store_true",
        default=OMITTED,
        help="gradients only through the last routing iteration (grad_through_routing=False)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/capsnet-mnist", metavar="DIR")
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help=f"continue from CHECKPOINT (default: DIR/{CHECKPOINT}) up to --epochs, with the checkpoint's "
        "options for the learning rate, batch, seed, dtype, augmentation, loss, data selection and model",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="write no PNGs")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of ``argv``, every one filled in, except with ``--resume``: there the omitted
    options of :data:`TRAJECTORY_OPTIONS` stay :data:`OMITTED` for :func:`run` to take from the
    checkpoint."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            parser.error(f"argument --device: {e}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"argument --device: {args.device!r} asked for but CUDA is not available")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"argument --device: expected auto, cpu or cuda[:N], got {args.device!r}")
    if args.backend == "triton":
        device = _select_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        reason = triton_unavailable_reason(device)
        if reason is not None:
            parser.error(f"argument --backend: triton cannot run here: {reason}")
    weight = args.reconstruction_weight
    if weight is not OMITTED and not (math.isfinite(weight) and weight >= 0):
        parser.error(f"argument --reconstruction-weight: expected >= 0, got {weight}")
    if args.resume is None:
        _fill_defaults(args)
    return args


def _fill_defaults(args: argparse.Namespace) -> None:
    for name, default in TRAJECTORY_OPTIONS.items():
        if getattr(args, name) is OMITTED:
            setattr(args, name, default)


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _select_device(arg: str, local_rank: int) -> torch.device:
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _setup_distributed(device_arg: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (none: single process)."""
    info = DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    device = _select_device(device_arg, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


class _Log:
    """Messages from rank 0 only, routed around live progress bars."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()


def _load_data(args: argparse.Namespace):
    """(train images, train labels, eval images, eval labels, description of the split)."""
    root = Path(args.data_dir)
    test_x, test_y = data.load_mnist(root, "test", download=not args.no_download)
    if args.holdout is not None:
        if args.holdout >= len(test_x):
            raise SetupError(
                f"--holdout {args.holdout} must be smaller than the {len(test_x)} test images "
                "(the rest are the training set)"
            )
        split = len(test_x) - args.holdout
        train_x, train_y = test_x[:split], test_y[:split]
        eval_x, eval_y = test_x[split:], test_y[split:]
        source = f"test images [0, {split}) for training, [{split}, {len(test_x)}) held out"
    else:
        train_x, train_y = data.load_mnist(root, "train", download=not args.no_download)
        eval_x, eval_y = test_x, test_y
        source = "training set / test set"
    if args.limit_train is not None:
        train_x, train_y = train_x[: args.limit_train], train_y[: args.limit_train]
    if args.limit_test is not None:
        eval_x, eval_y = eval_x[: args.limit_test], eval_y[: args.limit_test]
    return train_x, train_y, eval_x, eval_y, source


def _model_config(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in MODEL_OPTIONS}


def _build_model(args: argparse.Namespace) -> CapsNet:
    return CapsNet(
        conv_channels=args.conv_channels,
        primary_types=args.primary_types,
        primary_dim=args.primary_dim,
        out_dim=args.out_dim,
        iterations=args.iterations,
        grad_through_routing=not args.detach_routing,
        decoder_hidden=args.decoder_hidden,
        backend=args.backend,
    )


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per epoch, identical on every rank, drives the shuffle and the shifts: a
    # resumed run draws exactly what an uninterrupted one would have. Modulo 2**64 because
    # manual_seed takes 64 bits; smaller values (every small seed's) are left as they were.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)


def _totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, info: DistInfo) -> tuple[float, float, int]:
    """Mean loss, accuracy and example count over every rank's share (one sync, one all-reduce)."""
    t = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(seen))])
    if info.distributed:
        dist.all_reduce(t)
    loss_sum, correct, n = t.tolist()
    return loss_sum / max(n, 1), correct / max(n, 1), int(n)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False, dynamic_ncols=True)


def _loss(net, criterion, x, y, target, amp_dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's loss (margin + reconstruction) and capsule lengths; ``target`` masks the
    decoder in training (None: the longest capsule, at evaluation)."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
        v, reconstruction = net(x, target=target)
    lengths = capsule_lengths(v.float())
    images = None if reconstruction is None else x  # the reconstruction term needs both
    return criterion(lengths, y, reconstruction, images), lengths


def _check_finite_loss(first_bad: torch.Tensor, epoch: int, steps: int, lr: float, info: DistInfo) -> None:
    """Raise :class:`TrainingError` if ``first_bad`` (on the device) holds a step whose loss was
    non-finite on any rank."""
    if info.distributed:
        # Every rank must stop at the same check: one that went on would wait forever in the
        # next gradient all-reduce.
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    step = int(first_bad)
    if step != _NO_STEP:
        raise TrainingError(
            f"the training loss became non-finite at epoch {epoch + 1}, step {step + 1} of {steps} "
            f"(learning rate {lr:g})"
        )


def _train_epoch(net, criterion, optimizer, scaler, x_all, y_all, args, epoch, device, info, bar_on):
    """One epoch over ``x_all`` (uint8 images already on ``device``) and ``y_all``; raises
    :class:`TrainingError` within :data:`FINITE_CHECK_EVERY` steps of a non-finite loss."""
    net.train()
    gen = _epoch_generator(args.seed, epoch)
    amp_dtype = DTYPES[args.dtype]
    lr = optimizer.param_groups[0]["lr"]
    # Kept on the device: no synchronisation per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.full((), _NO_STEP, dtype=torch.int64, device=device)
    seen = 0
    start = time.perf_counter()
    batches = list(
        data.shard_batches(len(x_all), args.batch_size, info.rank, info.world_size, shuffle=True, generator=gen)
    )
    with _progress(len(x_all), f"epoch {epoch + 1}/{args.epochs}", bar_on) as bar:
        for step, (batch, mine) in enumerate(batches):
            # Shifts drawn for the whole global batch on every rank keep the ranks' streams equal.
            shifts = None if args.no_augment else data.draw_shifts(batch.numel(), MAX_SHIFT, gen)
            idx = batch[mine].to(device)
            x, y = data.to_float(x_all[idx]), y_all[idx]
            if shifts is not None:
                x = data.random_shift(x, MAX_SHIFT, shifts=shifts[mine])
            loss, lengths = _loss(net, criterion, x, y, y, amp_dtype, device)
            first_bad = torch.where(loss.detach().isfinite(), first_bad, first_bad.clamp(max=step))
            # DDP averages gradients over ranks; weighting each rank's mean by its share of the
            # global batch makes that average the gradient of the global batch's mean loss.
            share = len(idx) * info.world_size / batch.numel()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss * share).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach().double() * len(idx)
            correct += (lengths.detach().argmax(1) == y).sum()
            seen += len(idx)
            bar.update(batch.numel())
            if bar_on and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % FINITE_CHECK_EVERY == 0:
                _check_finite_loss(first_bad, epoch, len(batches), lr, info)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    _check_finite_loss(first_bad, epoch, len(batches), lr, info)
    loss, accuracy, n = _totals(loss_sum, correct, seen, info)
    return {
        "train_loss": loss,
        "train_accuracy": accuracy,
        "train_examples": n,
        "train_seconds": seconds,
        "train_examples_per_s": n / seconds,
    }


@torch.no_grad()
def _evaluate(net, criterion, x_all, y_all, args, device, info, bar_on):
    """Loss and accuracy over ``x_all`` (uint8 images already on ``device``) and ``y_all``."""
    net.eval()
    amp_dtype = DTYPES[args.dtype]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    start = time.perf_counter()
    bar = _progress(len(x_all), "evaluate", bar_on)
    batches = data.shard_batches(len(x_all), args.batch_size, info.rank, info.world_size, drop_small_last=False)
    for batch, mine in batches:
        idx = batch[mine].to(device)
        bar.update(batch.numel())
        if len(idx) == 0:
            continue
        x, y = data.to_float(x_all[idx]), y_all[idx]
        loss, lengths = _loss(net, criterion, x, y, None, amp_dtype, device)
        loss_sum += loss.double() * len(idx)
        correct += (lengths.argmax(1) == y).sum()
        seen += len(idx)
    bar.close()
    loss, accuracy, n = _totals(loss_sum, correct, seen, info)
    return {
        "test_loss": loss,
        "test_accuracy": accuracy,
        "test_error": 1 - accuracy,
        "test_examples": n,
        "test_seconds": time.perf_counter() - start,
    }


def _nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    named = list(model.named_parameters())
    finite = torch.stack([p.detach().isfinite().all() for _, p in named]).tolist()  # one sync
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def _digest(state: object) -> str:
    """sha256 of ``state``'s content (nested dicts, lists and tuples of tensors and plain values),
    the same for a state and its round trip through torch.save and torch.load."""
    h = hashlib.sha256()

    def feed(x: object) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"dict {len(x)}\n".encode())
            for key, value in x.items():
                feed(key)
                feed(value)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__} {len(x)}\n".encode())
            for value in x:
                feed(value)
        else:
            h.update(f"{type(x).__name__} {x!r}\n".encode())

    feed(state)
    return h.hexdigest()


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` with ``write(file)`` so that a crash at any moment leaves either the old
    file or the complete new one, never a part: a temporary file in the same directory, on disk
    before it replaces ``path``, and the replacement on disk before this returns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666, not mkstemp (0o600): the file gets the permissions the umask gives.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename lives in the directory; Windows cannot open one to fsync it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finite_or_none(value: object) -> object:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _write_json(path: Path, value: object) -> None:
    text = json.dumps(_finite_or_none(value), indent=2, allow_nan=False) + "\n"
    _write_atomically(path, lambda f: f.write(text.encode()))


def _save_checkpoint(path: Path, model, optimizer, scheduler, scaler, epoch, history, args):
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "history": history,
        "model_config": _model_config(args),
        "args": dict(vars(args)),
    }
    state["sha256"] = _digest(state)
    _write_atomically(path, lambda f: torch.save(state, f))


def _describe(error: BaseException) -> str:
    first = str(error).strip().split("\n")[0].split(". ")[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _read_checkpoint(path: Path) -> dict:
    """The verified content of the checkpoint at ``path``; :class:`CheckpointError` naming it if
    it is damaged, truncated or not a capstriton-train checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    unusable = f"--resume: {path} is not a usable capstriton-train checkpoint"
    # Warnings from torch.load about a damaged file would only clutter the error; a good file's
    # are passed on below.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        # Damaged bytes make torch.load raise whatever its reader or unpickler trips over
        # (RuntimeError, EOFError, UnpicklingError, KeyError, UnicodeDecodeError, ...).
        except Exception as e:
            raise CheckpointError(f"{unusable}: it is truncated or damaged, torch.load fails ({_describe(e)})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{unusable}: it has no 'format': {CHECKPOINT_FORMAT!r} entry")
    # torch.save's per-record CRC-32s are not enough: torch.load does not check them, and checking
    # them with zipfile misses damage to zip fields that only torch's reader acts on (a flipped bit
    # in a directory entry's attributes makes it read other bytes into a tensor). The digest covers
    # what was loaded, whatever part of the file was hit.
    stored = state.pop("sha256", None)
    if stored != _digest(state):
        raise CheckpointError(f"{unusable}: it is damaged, its content does not match the sha256 digest it holds")
    missing = sorted(_CHECKPOINT_KEYS - state.keys())
    missing += [f"args[{k!r}]" for k in TRAJECTORY_OPTIONS if k not in state.get("args", {})]
    if missing:
        raise CheckpointError(f"{unusable}: it lacks {', '.join(missing)} (written by another capstriton version?)")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return state


def _adopt_checkpoint_options(args: argparse.Namespace, state: dict, path: Path) -> None:
    """Fill in the omitted :data:`TRAJECTORY_OPTIONS` from the checkpoint's; raise
    :class:`SetupError` for given ones that differ, or for an ``--epochs`` already reached."""
    saved = state["args"]
    conflicts = []
    for name in TRAJECTORY_OPTIONS:
        given = getattr(args, name)
        if given is OMITTED:
            setattr(args, name, saved[name])
        elif given != saved[name]:
            conflicts.append(f"{_flag(name)} {_show(saved[name])} in the checkpoint, {_show(given)} now")
    if conflicts:
        raise SetupError(
            f"--resume: {path} was trained with other options, which a resumed run keeps: "
            + "; ".join(conflicts)
            + ". Omit them to continue with the checkpoint's, or start a new run without --resume."
        )
    trained = int(state["epoch"])
    if args.epochs <= trained:
        raise SetupError(
            f"--epochs {args.epochs}: the checkpoint {path} has already trained {trained} epochs; "
            f"pass --epochs > {trained}"
        )


def _restore(state: dict, model, optimizer, scheduler, scaler) -> tuple[int, list]:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), list(state["history"])


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss (margin + reconstruction)", title="Loss")
    ax_err.plot(epochs, [100 * (1 - h["train_accuracy"]) for h in history], "o-", label="train")
    ax_err.plot(epochs, [100 * h["test_error"] for h in history], "s-", label="test")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="Classification error")
    if all(100 * h["test_error"] > 0 and h["train_accuracy"] < 1 for h in history):
        ax_err.set_yscale("log")
    for ax in (ax_loss, ax_err):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def _plot_reconstructions(model: CapsNet, x_all, y_all, device, path: Path, count: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    count = min(count, len(x_all))
    x, y_all = data.to_float(x_all[:count]).to(device), y_all[:count].cpu()
    v, reconstruction = model(x)
    pred = capsule_lengths(v).argmax(1).cpu()
    images = x.squeeze(1).cpu()
    recon = reconstruction.float().reshape(count, *images.shape[1:]).cpu()
    cols = 8
    rows = 2 * math.ceil(count / cols)  # each row of digits above the row of their reconstructions
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        r, c = 2 * (i // cols), i % cols
        axes[r, c].imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, c].set_title(f"label {int(y_all[i])}", fontsize=8)
        axes[r + 1, c].imshow(recon[i].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r + 1, c].set_title(f"recon. {int(pred[i])}", fontsize=8, color="black" if pred[i] == y_all[i] else "red")
    fig.suptitle(
        "Test digits (odd rows) and reconstructions from the longest capsule (even rows)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rank_divergence(model: torch.nn.Module, info: DistInfo) -> float:
    """Largest difference of any parameter between ranks (0 when they are in sync)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def _check_finite_epoch(model: torch.nn.Module, test: dict, epoch: int) -> None:
    """Raise :class:`TrainingError` unless the parameters and the test loss after ``epoch`` are
    finite: only then may the epoch be saved."""
    bad = _nonfinite_parameters(model)
    if bad:
        raise TrainingError(f"parameters {', '.join(bad)} became non-finite in epoch {epoch + 1}")
    if not math.isfinite(test["test_loss"]):
        raise TrainingError(f"the test loss after epoch {epoch + 1} is {test['test_loss']}")


def _make_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SetupError(f"--out {out}: cannot create the output directory: {e}") from e


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate as ``args`` (from :func:`parse_args`) say; return the metrics.

    With ``args.resume``, the omitted :data:`TRAJECTORY_OPTIONS` (:data:`OMITTED`) become the
    checkpoint's: ``args`` is updated to the values the run uses.
    """
    info, device = _setup_distributed(args.device)
    out = Path(args.out)
    state = None
    if args.resume is not None:
        checkpoint = Path(args.resume) if args.resume else out / CHECKPOINT
        state = _read_checkpoint(checkpoint)
        _adopt_checkpoint_options(args, state, checkpoint)
    else:
        _fill_defaults(args)  # done already if args come from parse_args, not build_parser
    if args.batch_size < info.world_size:
        raise SetupError(
            f"--batch-size {args.batch_size} is the global batch and must be at least the "
            f"number of processes ({info.world_size})"
        )
    log = _Log(info.main)
    bar_on = info.main and not args.no_progress and sys.stderr.isatty()
    if info.main:
        _make_output_dir(out)

    train_x, train_y, eval_x, eval_y, source = _load_data(args)
    torch.manual_seed(args.seed)
    model = _build_model(args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    criterion = CapsuleLoss(reconstruction_weight=args.reconstruction_weight)

    start_epoch, history = 0, []
    # Where a run that stops can be resumed from: named in the error.
    last_good = "no checkpoint was written"
    if state is not None:
        start_epoch, history = _restore(state, model, optimizer, scheduler, scaler)
        del state  # its CPU copy of the training state
        last_good = f"{checkpoint} (epoch {start_epoch}) is the last good checkpoint"
        log(f"resumed from {checkpoint} after epoch {start_epoch}")

    net: torch.nn.Module = model
    if info.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eval_net: torch.nn.Module = model
    if args.compile:
        net, eval_net = torch.compile(net), torch.compile(model)

    log(
        f"capstriton {__version__} | torch {torch.__version__} | device {device} x "
        f"{info.world_size} process(es) | backend {args.backend} | dtype {args.dtype}"
    )
    log(
        f"CapsNet: {n_params:,} parameters | {len(train_x)} training, {len(eval_x)} test examples "
        f"({source}) | global batch {args.batch_size}"
    )

    def current_metrics() -> dict:
        return {
            "capstriton_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "world_size": info.world_size,
            "parameters": n_params,
            "data": source,
            "train_examples": len(train_x),
            "test_examples": len(eval_x),
            "config": dict(vars(args)),
            "history": history,
            "final": {k: history[-1][k] for k in ("test_accuracy", "test_error", "test_loss")} if history else {},
        }

    # The splits live on the device as uint8 for the whole run: each step indexes there.
    train_x, train_y, eval_x, eval_y = (t.to(device) for t in (train_x, train_y, eval_x, eval_y))
    metrics = current_metrics()
    for epoch in range(start_epoch, args.epochs):
        lr = optimizer.param_groups[0]["lr"]
        try:
            train = _train_epoch(net, criterion, optimizer, scaler, train_x, train_y, args, epoch, device, info, bar_on)
            scheduler.step()
            test = _evaluate(eval_net, criterion, eval_x, eval_y, args, device, info, bar_on)
            record = {"epoch": epoch + 1, "lr": lr, **train, **test}
            log(
                f"epoch {epoch + 1}/{args.epochs}  lr {lr:.3g}  train loss {train['train_loss']:.4f} "
                f"acc {100 * train['train_accuracy']:.2f}%  |  test loss {test['test_loss']:.4f} "
                f"acc {100 * test['test_accuracy']:.2f}% err {100 * test['test_error']:.2f}%  |  "
                f"{train['train_examples_per_s']:.0f} ex/s, {train['train_seconds']:.1f} s"
            )
            _check_finite_epoch(model, test, epoch)
        except TrainingError as e:
            raise TrainingError(f"{e}. Nothing of epoch {epoch + 1} was saved: {last_good}") from None
        history.append(record)
        metrics = current_metrics()
        if info.main:
            _save_checkpoint(out / CHECKPOINT, model, optimizer, scheduler, scaler, epoch + 1, history, args)
            _write_json(out / METRICS, metrics)
        last_good = f"{out / CHECKPOINT} (epoch {epoch + 1}) is the last good checkpoint"

    if info.distributed:
        metrics["rank_parameter_max_abs_diff"] = _rank_divergence(model, info)
    if history:
        final = history[-1]
        log(
            f"test accuracy {100 * final['test_accuracy']:.2f}%  error "
            f"{100 * final['test_error']:.2f}% on {final['test_examples']} examples"
        )
    if info.main:
        if info.distributed:
            _write_json(out / METRICS, metrics)
        if not args.no_plots and history:
            _plot_curves(history, out / CURVES)
            if model.decoder is not None:
                _plot_reconstructions(model, eval_x, eval_y, device, out / RECONSTRUCTIONS)
        log(f"wrote {out / METRICS}, {out / CHECKPOINT}" + ("" if args.no_plots else " and plots"))
    if info.distributed:
        dist.barrier()
    return metrics


def _fail(error: Exception, code: int) -> int:
    print(f"capstriton-train: error: {error}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 for options that contradict the data, the checkpoint or
    the output directory, 1 when training stops on a non-finite loss or parameter."""
    args = parse_args(argv)
    try:
        run(args)
    except (data.MNISTDataError, SetupError, FileNotFoundError) as e:
        return _fail(e, 2)
    except TrainingError as e:
        return _fail(e, 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
