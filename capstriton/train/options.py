"""The command line: argument types, :data:`OMITTED`, the help, :func:`build_parser`,
:func:`parse_args`, the defaults of a new run from the chosen model's entry, and the names of the
files a run writes into ``--out``."""

from __future__ import annotations

import argparse
import math

import torch

from .._checks import BACKENDS, triton_unavailable_reason
from . import distributed
from .errors import SetupError
from .loop import DTYPES
from .models import DEFAULT_MODEL, MODEL_OPTIONS, MODELS, TRAJECTORY_OPTIONS, ModelEntry

__all__ = [
    "OMITTED",
    "CHECKPOINT",
    "METRICS",
    "CURVES",
    "RECONSTRUCTIONS",
    "build_parser",
    "parse_args",
    "fill_defaults",
    "options_not_taken",
    "not_taken_message",
    "show",
    "flag",
]

# The files a run writes into --out.
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVES = "training_curves.png"
RECONSTRUCTIONS = "reconstructions.png"


class _Omitted:
    """The argparse default of :data:`TRAJECTORY_OPTIONS`, to tell an omitted option from a given
    one (None cannot: it is a value of --decoder-hidden, --holdout and --limit-train)."""

    def __repr__(self) -> str:
        return "OMITTED"


OMITTED = _Omitted()


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


def show(value: object) -> str:
    """An option's value as the command line spells it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def flag(name: str) -> str:
    """The command-line spelling of the option ``name`` (``lr_decay`` -> ``--lr-decay``)."""
    return "--" + name.replace("_", "-")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # The trajectory options' argparse default is OMITTED: show a new run's default instead, per
    # model where the models that take the option differ ("0.001 for capsnet, 0.0005 for
    # efficient-capsnet").
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest in TRAJECTORY_OPTIONS:
            if action.dest == "model":
                default = DEFAULT_MODEL
            else:
                given = {name: show(e.defaults[action.dest]) for name, e in MODELS.items() if action.dest in e.defaults}
                values = list(dict.fromkeys(given.values()))
                default = values[0] if len(values) == 1 else ", ".join(f"{v} for {n}" for n, v in given.items())
            default = default.replace("%", "%%")
            return f"{action.help or ''} (default: {default}; with --resume: the checkpoint's)".lstrip()
        if action.help and "(default:" in action.help:  # a default the help describes (--out's)
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line. The options of :data:`TRAJECTORY_OPTIONS` parse to :data:`OMITTED` when
    omitted: :func:`parse_args` fills in their defaults (or :func:`run`, when resuming, the
    checkpoint's)."""
    p = argparse.ArgumentParser(
        prog="capstriton-train",
        description=(
            "Train a capsule network on MNIST, evaluate it on the test set: the CapsNet of Sabour et al. "
            "2017 (the default) or Efficient-CapsNet of Mazzia et al. 2021 (--model efficient-capsnet)."
        ),
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
        choices=BACKENDS,
        default="auto",
        help="routing implementation: auto is triton on CUDA, torch on CPU",
    )

    # The options of every entry of MODELS (models.MODEL_OPTIONS); each model takes some of them.
    g = p.add_argument_group("model (defaults: the papers')")
    g.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=OMITTED,
        help="the model to train: " + "; ".join(f"{name} ({entry.description})" for name, entry in MODELS.items()),
    )
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
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="the run's folder: checkpoint, metrics and plots (default: runs/MODEL-mnist, MODEL the --model "
        f"given, else {DEFAULT_MODEL})",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help=f"continue from CHECKPOINT (default: DIR/{CHECKPOINT}) up to --epochs, with the checkpoint's "
        "options for the learning rate, batch, seed, dtype, augmentation, loss, data selection and model",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help=f"start a new run in a DIR that holds one (its {CHECKPOINT} is refused otherwise: a forgotten --resume "
        "would replace it); the new run's files replace the old run's",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="write no PNGs")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of ``argv``, every one filled in (see :func:`fill_defaults`), except with
    ``--resume``: there the omitted options of :data:`TRAJECTORY_OPTIONS` stay :data:`OMITTED`
    for :func:`run` to take from the checkpoint."""
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
    fill_out(args)
    if args.overwrite and args.resume is not None:
        parser.error("argument --overwrite: starts a new run, --resume continues one: give one of them")
    if args.backend == "triton":
        try:
            local_rank = distributed.env_int("LOCAL_RANK", 0, 0)
        except SetupError as e:
            parser.error(str(e))
        device = distributed.select_device(args.device, local_rank)
        reason = triton_unavailable_reason(device)
        if reason is not None:
            parser.error(f"argument --backend: triton cannot run here: {reason}")
    weight = args.reconstruction_weight
    if weight is not OMITTED and not (math.isfinite(weight) and weight >= 0):
        parser.error(f"argument --reconstruction-weight: expected >= 0, got {weight}")
    # With --resume and no --model, the checkpoint names the model (checkpoint.adopt_options checks).
    if args.resume is None or args.model is not OMITTED:
        entry = MODELS[DEFAULT_MODEL if args.model is OMITTED else args.model]
        foreign = options_not_taken(args, entry)
        if foreign:
            parser.error(f"argument {not_taken_message(foreign, entry)}")
    if args.resume is None:
        fill_defaults(args)
    return args


def fill_out(args: argparse.Namespace) -> None:
    """``--out``'s default, ``runs/MODEL-mnist`` for the ``--model`` given (else the default
    model), where the option was omitted."""
    if args.out is None:
        args.out = f"runs/{DEFAULT_MODEL if args.model is OMITTED else args.model}-mnist"


def options_not_taken(args: argparse.Namespace, entry: ModelEntry) -> list[str]:
    """The model options given in ``args`` that ``entry``'s model does not take."""
    return [name for name in MODEL_OPTIONS if name not in entry.options and getattr(args, name, OMITTED) is not OMITTED]


def not_taken_message(names: list[str], entry: ModelEntry) -> str:
    """What to say about the options ``names`` given for ``entry``'s model, which takes none of them."""
    takes = ", ".join(map(flag, entry.options)) or "no model options"
    what = "not an option" if len(names) == 1 else "not options"
    return f"{', '.join(map(flag, names))}: {what} of --model {entry.name} (it takes {takes})"


def fill_defaults(args: argparse.Namespace) -> None:
    """Give the omitted :data:`TRAJECTORY_OPTIONS` of ``args`` the values of a new run: ``--model``
    :data:`DEFAULT_MODEL`, the others its entry's defaults. The options of other models are
    dropped from ``args``: it holds the options the run uses. :class:`SetupError` for a given
    option the model does not take."""
    if args.model is OMITTED:
        args.model = DEFAULT_MODEL
    entry = MODELS[args.model]
    foreign = options_not_taken(args, entry)
    if foreign:
        raise SetupError(not_taken_message(foreign, entry))
    for name in MODEL_OPTIONS:
        if name not in entry.options and hasattr(args, name):
            delattr(args, name)
    for name, default in entry.defaults.items():
        if getattr(args, name) is OMITTED:
            setattr(args, name, default)
