"""The training loop: the log, progress bars, the loss of a batch, the per-epoch generator, the
non-finite checks, :func:`train_epoch` and :func:`evaluate`. Any model of
:data:`capstriton.train.models.MODELS` runs through it unchanged."""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

from .. import data
from ..nn import capsule_lengths
from . import distributed
from .distributed import DistInfo
from .errors import TrainingError

__all__ = [
    "DTYPES",
    "MAX_SHIFT",
    "FINITE_CHECK_EVERY",
    "Log",
    "batch_loss",
    "epoch_generator",
    "train_epoch",
    "evaluate",
    "check_finite_epoch",
]

#: The ``--dtype`` choices: the autocast dtype of the forward pass.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The paper's augmentation: random shifts of up to 2 pixels in each direction.
MAX_SHIFT = 2
#: Training records a non-finite loss on the device every step but looks at that record (which
#: waits for the device) only every this many steps and at the end of the epoch.
FINITE_CHECK_EVERY = 32
_NO_STEP = torch.iinfo(torch.int64).max


class Log:
    """Messages from rank 0 only, routed around live progress bars."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False, dynamic_ncols=True)


def batch_loss(net, criterion, x, y, target, amp_dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's loss (margin + reconstruction) and capsule lengths; ``target`` masks the
    decoder in training (None: the longest capsule, at evaluation)."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
        v, reconstruction = net(x, target=target)
    lengths = capsule_lengths(v.float())
    images = None if reconstruction is None else x  # the reconstruction term needs both
    return criterion(lengths, y, reconstruction, images), lengths


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of ``epoch``'s shuffle and shifts."""
    # One generator per epoch, identical on every rank, drives the shuffle and the shifts: a
    # resumed run draws exactly what an uninterrupted one would have. Modulo 2**64 because
    # manual_seed takes 64 bits; smaller values (every small seed's) are left as they were.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)


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


def train_epoch(net, criterion, optimizer, scaler, x_all, y_all, args, epoch, device, info, bar_on):
    """One epoch over ``x_all`` (uint8 images already on ``device``) and ``y_all``; raises
    :class:`TrainingError` within :data:`FINITE_CHECK_EVERY` steps of a non-finite loss."""
    net.train()
    gen = epoch_generator(args.seed, epoch)
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
            loss, lengths = batch_loss(net, criterion, x, y, y, amp_dtype, device)
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
    loss, accuracy, n = distributed.totals(loss_sum, correct, seen, info)
    return {
        "train_loss": loss,
        "train_accuracy": accuracy,
        "train_examples": n,
        "train_seconds": seconds,
        "train_examples_per_s": n / seconds,
    }


@torch.no_grad()
def evaluate(net, criterion, x_all, y_all, args, device, info, bar_on):
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
        loss, lengths = batch_loss(net, criterion, x, y, None, amp_dtype, device)
        loss_sum += loss.double() * len(idx)
        correct += (lengths.argmax(1) == y).sum()
        seen += len(idx)
    bar.close()
    loss, accuracy, n = distributed.totals(loss_sum, correct, seen, info)
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


def check_finite_epoch(model: torch.nn.Module, test: dict, epoch: int) -> None:
    """Raise :class:`TrainingError` unless the parameters and the test loss after ``epoch`` are
    finite: only then may the epoch be saved."""
    bad = _nonfinite_parameters(model)
    if bad:
        raise TrainingError(f"parameters {', '.join(bad)} became non-finite in epoch {epoch + 1}")
    if not math.isfinite(test["test_loss"]):
        raise TrainingError(f"the test loss after epoch {epoch + 1} is {test['test_loss']}")
