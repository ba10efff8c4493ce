"""The training and evaluation splits of MNIST the options select (``--holdout``,
``--limit-train``, ``--limit-test``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import data
from .errors import SetupError

__all__ = ["load"]


def load(args: argparse.Namespace):
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
        source += f"; training on the first {len(train_x)} of them"
    if args.limit_test is not None:
        eval_x, eval_y = eval_x[: args.limit_test], eval_y[: args.limit_test]
        source += f"; testing on the first {len(eval_x)}"
    return train_x, train_y, eval_x, eval_y, source
