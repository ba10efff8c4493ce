"""A run from start to end (:func:`run`) and the command line's exit status (:func:`main`).

The other modules are called through their module (``loop.train_epoch(...)``), so that a test
can replace one function of them for a run.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
from pathlib import Path

import torch

from .. import __version__, data
from ..nn import CapsuleLoss
from . import checkpoint, distributed, loop, models, options, plots, splits
from .errors import SetupError, TrainingError
from .options import CHECKPOINT, CURVES, METRICS, RECONSTRUCTIONS

__all__ = ["run", "main"]


def _make_output_dir(out: Path, new_run: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out} is a file, not a directory")
    if new_run and not overwrite and (out / CHECKPOINT).exists():
        raise SetupError(
            f"--out {out} holds a run already ({out / CHECKPOINT}): continue it with --resume, start a new one "
            "there with --overwrite, or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SetupError(f"--out {out}: cannot create the output directory: {e}") from e


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate as ``args`` (from :func:`parse_args`) say; return the metrics.

    With ``args.resume``, the omitted :data:`TRAJECTORY_OPTIONS` (:data:`OMITTED`) become the
    checkpoint's: ``args`` is updated to the values the run uses.
    """
    info, device = distributed.setup(args.device)
    options.fill_out(args)  # done already if args come from parse_args, not build_parser
    out = Path(args.out)
    state = None
    if args.resume is not None:
        path = Path(args.resume) if args.resume else out / CHECKPOINT
        state = checkpoint.read(path)
        checkpoint.adopt_options(args, state, path)
    else:
        options.fill_defaults(args)  # done already if args come from parse_args, not build_parser
    if args.batch_size < info.world_size:
        raise SetupError(
            f"--batch-size {args.batch_size} is the global batch and must be at least the "
            f"number of processes ({info.world_size})"
        )
    log = loop.Log(info.main)
    bar_on = info.main and not args.no_progress and sys.stderr.isatty()
    if info.main:
        _make_output_dir(out, args.resume is None, args.overwrite)

    train_x, train_y, eval_x, eval_y, source = splits.load(args)
    if len(train_x) < info.world_size:  # each process's share of a batch would be empty: no step at all
        raise SetupError(
            f"{len(train_x)} training example(s) for {info.world_size} processes: each needs at least one "
            "(--holdout or --limit-train leave too few)"
        )
    torch.manual_seed(args.seed)
    model = models.MODELS[args.model].build(args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    criterion = CapsuleLoss(reconstruction_weight=args.reconstruction_weight)

    start_epoch, history = 0, []
    # Where a run that stops can be resumed from: named in the error.
    last_good = "no checkpoint was written"
    if state is not None:
        start_epoch, history = checkpoint.restore(state, model, optimizer, scheduler, scaler)
        del state  # its CPU copy of the training state
        last_good = f"{path} (epoch {start_epoch}) is the last good checkpoint"
        log(f"resumed from {path} after epoch {start_epoch}")

    net = distributed.wrap(model, device, info)
    eval_net: torch.nn.Module = model
    if args.compile:
        net, eval_net = torch.compile(net), torch.compile(model)

    log(
        f"capstriton {__version__} | torch {torch.__version__} | device {device} x "
        f"{info.world_size} process(es) | backend {args.backend} | dtype {args.dtype}"
    )
    log(
        f"{type(model).__name__}: {n_params:,} parameters | {len(train_x)} training, {len(eval_x)} test examples "
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
            train = loop.train_epoch(
                net, criterion, optimizer, scaler, train_x, train_y, args, epoch, device, info, bar_on
            )
            scheduler.step()
            test = loop.evaluate(eval_net, criterion, eval_x, eval_y, args, device, info, bar_on)
            record = {"epoch": epoch + 1, "lr": lr, **train, **test}
            log(
                f"epoch {epoch + 1}/{args.epochs}  lr {lr:.3g}  train loss {train['train_loss']:.4f} "
                f"acc {100 * train['train_accuracy']:.2f}%  |  test loss {test['test_loss']:.4f} "
                f"acc {100 * test['test_accuracy']:.2f}% err {100 * test['test_error']:.2f}%  |  "
                f"{train['train_examples_per_s']:.0f} ex/s, {train['train_seconds']:.1f} s"
            )
            loop.check_finite_epoch(model, test, epoch)
        except TrainingError as e:
            raise TrainingError(f"{e}. Nothing of epoch {epoch + 1} was saved: {last_good}") from None
        history.append(record)
        metrics = current_metrics()
        if info.main:
            checkpoint.save(out / CHECKPOINT, model, optimizer, scheduler, scaler, epoch + 1, history, args)
            checkpoint.write_json(out / METRICS, metrics)
        last_good = f"{out / CHECKPOINT} (epoch {epoch + 1}) is the last good checkpoint"

    if info.distributed:
        metrics["rank_parameter_max_abs_diff"] = distributed.rank_divergence(model, info)
    if history:
        final = history[-1]
        log(
            f"test accuracy {100 * final['test_accuracy']:.2f}%  error "
            f"{100 * final['test_error']:.2f}% on {final['test_examples']} examples"
        )
    if info.main:
        if info.distributed:
            checkpoint.write_json(out / METRICS, metrics)
        if not args.no_plots and history:
            plots.plot_curves(history, out / CURVES)
            if not plots.plot_reconstructions(model, eval_x, eval_y, device, out / RECONSTRUCTIONS):
                (out / RECONSTRUCTIONS).unlink(missing_ok=True)  # no decoder: none, not an older run's
        log(f"wrote {out / METRICS}, {out / CHECKPOINT}" + ("" if args.no_plots else " and plots"))
    distributed.barrier(info)
    return metrics


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what a run
    creates for its --out. None when ``path`` exists."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _fail(error: Exception, code: int, made: Path | None = None) -> int:
    """Report ``error``; ``made``: the outermost folder this run created for --out, removed when
    the run stopped before writing a file under it (a data error, a non-finite loss in the first
    epoch)."""
    print(f"capstriton-train: error: {error}", file=sys.stderr)
    if made is not None and made.is_dir() and not any(p.is_file() for p in made.rglob("*")):
        shutil.rmtree(made, ignore_errors=True)  # (torchrun: every process may get here)
    return code


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 for options that contradict the data, the checkpoint or
    the output directory, 1 when training stops on a non-finite loss or parameter."""
    args = options.parse_args(argv)
    made = _first_missing(Path(args.out))
    try:
        run(args)
    except (data.MNISTDataError, SetupError, FileNotFoundError) as e:
        return _fail(e, 2, made)
    except TrainingError as e:
        return _fail(e, 1, made)
    finally:
        distributed.teardown()
    return 0
