"""Checkpoints and the files next to them: the content digest, atomic writes, JSON without NaN,
:func:`save`, :func:`read` (verified, :class:`CheckpointError` otherwise), adopting a checkpoint's
options on ``--resume`` (:func:`adopt_options`) and :func:`restore`."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from .. import __version__
from . import models, options
from .errors import CheckpointError, SetupError

__all__ = [
    "CHECKPOINT_FORMAT",
    "LEGACY_MODEL",
    "digest",
    "write_atomically",
    "write_json",
    "save",
    "read",
    "saved_model",
    "adopt_options",
    "restore",
]

#: The checkpoint's "format" entry: what tells a capstriton-train checkpoint from other torch files.
CHECKPOINT_FORMAT = "capstriton-train-checkpoint"
_CHECKPOINT_KEYS = frozenset(
    {"format", "version", "epoch", "model", "optimizer", "scheduler", "scaler", "history", "args"}
)
#: The ``--model`` of a checkpoint whose options have none: written before the option existed,
#: when capstriton-train trained only the CapsNet.
LEGACY_MODEL = "capsnet"


def digest(state: object) -> str:
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


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
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


def write_json(path: Path, value: object) -> None:
    """``value`` as JSON in ``path``, written atomically, non-finite numbers as null."""
    text = json.dumps(_finite_or_none(value), indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))


def save(path: Path, model, optimizer, scheduler, scaler, epoch, history, args) -> None:
    """The training state after ``epoch`` epochs, with its digest, atomically in ``path``."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "history": history,
        "model_config": {k: getattr(args, k) for k in models.MODELS[args.model].options},
        "args": dict(vars(args)),
    }
    state["sha256"] = digest(state)
    write_atomically(path, lambda f: torch.save(state, f))


def _describe(error: BaseException) -> str:
    first = str(error).strip().split("\n")[0].split(". ")[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def saved_model(state: dict) -> str:
    """The ``--model`` the checkpoint ``state`` was trained with (``capsnet`` for checkpoints from
    before ``--model`` existed, or without readable options)."""
    saved = state.get("args")
    return saved.get("model", LEGACY_MODEL) if isinstance(saved, dict) else LEGACY_MODEL


def read(path: Path) -> dict:
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
    if stored != digest(state):
        raise CheckpointError(f"{unusable}: it is damaged, its content does not match the sha256 digest it holds")
    missing = sorted(_CHECKPOINT_KEYS - state.keys())
    saved = state["args"] if isinstance(state.get("args"), dict) else {}
    model = saved_model(state)
    if model not in models.MODELS:
        raise CheckpointError(f"{unusable}: it holds a --model {model} run, a model this capstriton version lacks")
    missing += [f"args[{k!r}]" for k in (*models.TRAINING_OPTIONS, *models.MODELS[model].options) if k not in saved]
    if missing:
        raise CheckpointError(f"{unusable}: it lacks {', '.join(missing)} (written by another capstriton version?)")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return state


def adopt_options(args: argparse.Namespace, state: dict, path: Path) -> None:
    """Fill in the omitted trajectory options (:data:`OMITTED`) from the checkpoint's: its
    ``--model`` and the options of that model; raise :class:`SetupError` for given ones that
    differ, for options the model does not take, or for an ``--epochs`` already reached.
    ``args`` then holds the options the resumed run uses, as :func:`options.fill_defaults` leaves
    them."""
    saved = {"model": saved_model(state), **state["args"]}
    entry = models.MODELS[saved["model"]]
    conflicts = []
    for name in ("model", *models.TRAINING_OPTIONS, *entry.options):
        given = getattr(args, name)
        if given is options.OMITTED:
            setattr(args, name, saved[name])
        elif given != saved[name]:
            conflicts.append(
                f"{options.flag(name)} {options.show(saved[name])} in the checkpoint, {options.show(given)} now"
            )
    if conflicts:
        raise SetupError(
            f"--resume: {path} was trained with other options, which a resumed run keeps: "
            + "; ".join(conflicts)
            + ". Omit them to continue with the checkpoint's, or start a new run without --resume."
        )
    foreign = options.options_not_taken(args, entry)
    if foreign:
        raise SetupError(
            f"--resume: {path} holds a --model {entry.name} run; {options.not_taken_message(foreign, entry)}"
        )
    options.fill_defaults(args)  # drops the other models' options: nothing is left to fill
    trained = int(state["epoch"])
    if args.epochs <= trained:
        raise SetupError(
            f"--epochs {args.epochs}: the checkpoint {path} has already trained {trained} epochs; "
            f"pass --epochs > {trained}"
        )


def restore(state: dict, model, optimizer, scheduler, scaler) -> tuple[int, list]:
    """Load ``state`` into the training objects; (epochs trained, history)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), list(state["history"])
