"""The models ``capstriton-train`` trains: one :class:`ModelEntry` per ``--model`` value.

Adding a model is adding an entry to :data:`MODELS` (and, for an option no model had before, its
``add_argument`` in the "model" group of :func:`capstriton.train.options.build_parser`): the
loop, the checkpoints and the plots do not know which model they run. They rely on this
interface: ``model(x, target=None)`` takes images ``[B, 1, 28, 28]`` in [0, 1] and returns
``(v, reconstruction)``, the class capsules ``v`` ``[B, 10, D]`` (the longest is the
prediction, their lengths feed the margin loss) and the reconstruction ``[B, 784]`` from the
capsule of ``target`` (None: the longest), or None for a model without a decoder: then the loss
is the margin loss alone and no reconstructions are plotted.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Callable, Mapping

import torch

from ..models import CapsNet, EfficientCapsNet

__all__ = [
    "ModelEntry",
    "MODELS",
    "DEFAULT_MODEL",
    "TRAINING_OPTIONS",
    "MODEL_OPTIONS",
    "TRAJECTORY_OPTIONS",
]

#: The options that shape the training trajectory whatever the model: every entry gives its
#: defaults for a new run.
TRAINING_OPTIONS = (
    "lr",
    "lr_decay",
    "batch_size",
    "seed",
    "dtype",
    "no_augment",
    "reconstruction_weight",
    "holdout",
    "limit_train",
)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One ``--model``: how to build it from the options and the defaults of a new run.

    ``options`` are the model options it takes (names of the CLI's "model" options, such as
    ``conv_channels``): they fix the model's shapes, so a checkpoint resumes only with the same
    ones; giving another model's option is an error. ``defaults`` holds the value of a new run
    for each of :data:`TRAINING_OPTIONS` and ``options``, and nothing else. ``build(args)``
    makes the model from a namespace holding them (and ``args.backend``).
    """

    name: str
    description: str
    build: Callable[[argparse.Namespace], torch.nn.Module]
    options: tuple[str, ...]
    defaults: Mapping[str, object]

    def __post_init__(self) -> None:
        expected = (*TRAINING_OPTIONS, *self.options)
        missing = [k for k in expected if k not in self.defaults]
        extra = [k for k in self.defaults if k not in expected]
        if missing or extra:
            raise ValueError(
                f"model {self.name!r}: defaults must hold exactly TRAINING_OPTIONS and its options; "
                f"missing {missing}, not options of it {extra}"
            )
        # In TRAINING_OPTIONS then option order, read-only: the table is shared by every run.
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "defaults", types.MappingProxyType({k: self.defaults[k] for k in expected}))


def _build_capsnet(args: argparse.Namespace) -> CapsNet:
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


#: Sabour, Frosst & Hinton 2017 with the paper's recipe: Adam with an exponentially decaying
#: learning rate, margin loss plus 0.0005 x the per-image sum of squared reconstruction errors.
CAPSNET = ModelEntry(
    name="capsnet",
    description="the CapsNet of Sabour et al. 2017: dynamic routing, optional decoder",
    build=_build_capsnet,
    options=(
        "conv_channels",
        "primary_types",
        "primary_dim",
        "out_dim",
        "iterations",
        "decoder_hidden",
        "detach_routing",
    ),
    defaults={
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
    },
)

def _build_efficient_capsnet(args: argparse.Namespace) -> EfficientCapsNet:
    return EfficientCapsNet(decoder_hidden=args.decoder_hidden, backend=args.backend)


#: Mazzia, Salvetti & Chiaberge 2021 with the paper's recipe: Adam 5e-4 decaying by 0.97 per
#: epoch, batch 16, reconstruction weight 0.392 on the per-pixel mean squared error, which is
#: 0.0005 x the per-image sum of squared errors (784 pixels), this library's convention.
EFFICIENT_CAPSNET = ModelEntry(
    name="efficient-capsnet",
    description="Efficient-CapsNet (Mazzia et al. 2021): self-attention routing, 161,824 parameters without decoder",
    build=_build_efficient_capsnet,
    options=("decoder_hidden",),
    defaults={
        "lr": 5e-4,
        "lr_decay": 0.97,
        "batch_size": 16,
        "seed": 0,
        "dtype": "float32",
        "no_augment": False,
        "reconstruction_weight": 0.0005,
        "holdout": None,
        "limit_train": None,
        "decoder_hidden": (512, 1024),
    },
)

#: The ``--model`` choices.
MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in (CAPSNET, EFFICIENT_CAPSNET)}
#: The ``--model`` of a new run that names none.
DEFAULT_MODEL = "capsnet"


#: The model options of all models, in table order: the CLI's "model" options besides --model.
MODEL_OPTIONS = tuple(dict.fromkeys(name for entry in MODELS.values() for name in entry.options))
#: The options that shape the training trajectory. A new run takes the omitted ones from its
#: model's entry; a resumed run takes them from its checkpoint, and giving one with another
#: value than the checkpoint's is an error.
TRAJECTORY_OPTIONS = ("model", *TRAINING_OPTIONS, *MODEL_OPTIONS)
