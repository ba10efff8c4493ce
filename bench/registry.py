"""The benchmark registry: one :class:`OpSpec` per benchmarked op, declared in ``bench/specs/``.

A spec says what the op computes and how to feed it (input maker, output shape), which
implementations time it, what an ideal kernel must move and compute per example, the targets its
results are judged against, and optionally which launch parameters ``bench/tune.py`` may vary and
which kernel launches ``bench/kernel_report.py`` compiles. The drivers (``routing_sweep.py``,
``plot_results.py``, ``tune.py``, ``kernel_report.py``) read nothing else: adding an op to the
bench is adding one module to ``bench/specs/`` (see ``bench/README.md``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Skip",
    "Target",
    "TuneSpec",
    "KernelCase",
    "OpSpec",
    "ModelSpec",
    "register",
    "register_model",
    "model_specs",
    "specs",
    "get",
    "implementation_names",
]


class Skip(Exception):
    """Raised by an implementation builder that cannot run here; the message is the reason."""


@dataclass(frozen=True)
class Target:
    """A performance target, reported met or not by the summary (never asserted)."""

    mode: str
    implementation: str
    #: "speedup_vs_eager", "speedup_vs_compile", "examples_per_s" or "memory_fraction_of_eager"
    quantity: str
    threshold: float
    #: where it comes from (DESIGN.md section 5, an issue)
    source: str
    #: the dtype whose results it judges
    dtype: str = "float32"

    @property
    def at_most(self) -> bool:
        return self.quantity == "memory_fraction_of_eager"


@dataclass(frozen=True)
class TuneSpec:
    """Launch parameters ``bench/tune.py`` may vary.

    ``knobs``: per mode, the parameter names varied in that mode and their default grids.
    ``call(sizes, overrides) -> fn(*inputs)``: the op with those launch parameters.
    ``launch(sizes, batch, overrides) -> dict``: the launch configuration they resolve to (recorded
    beside each timing, so a row shows what the kernels really got).
    """

    knobs: dict[str, dict[str, Sequence]]
    call: Callable
    launch: Callable


@dataclass(frozen=True)
class KernelCase:
    """One shape whose kernel launches ``bench/kernel_report.py`` records and compiles.

    ``run(tuning)`` calls the ops on fake CUDA tensors (nothing executes: the launches are
    recorded); ``tuning`` holds ``--config`` overrides of the op's launch parameters."""

    label: str
    shape_set: str  # "digitcaps" (the paper's layer) or "odd" (masks, padding, heuristics)
    run: Callable[[dict], None]


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op. ``sizes`` holds the common size options of the drivers (``n_in``,
    ``n_out``, ``d_in``, ``d``, ``iterations``, ``grad_through_routing``)."""

    name: str
    description: str
    #: ``make_inputs(sizes, batch, device, dtype, requires_grad, generator) -> list[Tensor]``
    make_inputs: Callable
    #: ``output_shape(sizes, batch) -> tuple``: the shape of the incoming gradient dv
    output_shape: Callable
    #: implementation name -> ``build(sizes, device, dtype) -> (fn, extra_params)``; ``fn`` takes
    #: the inputs; ``extra_params`` are tensors it owns that also get gradients (a module's
    #: weight); raises :class:`Skip` with the reason when it cannot run
    implementations: dict[str, Callable]
    #: ``min_bytes_per_example(sizes, dtype, mode, batch)``: what an ideal kernel must move
    min_bytes_per_example: Callable
    #: ``flops_per_example(sizes, mode)``: arithmetic of one example (for rooflines)
    flops_per_example: Callable
    targets: tuple[Target, ...] = ()
    #: in the sweep when no --op is given
    default: bool = True
    tune: TuneSpec | None = None
    #: ``kernel_cases() -> list[KernelCase]``
    kernel_cases: Callable | None = None
    #: parameters of ``--config KEY=VALUE`` in the kernel report (the op's launch knobs)
    config_keys: tuple[str, ...] = field(default=())
    #: sizes the op always takes, over the drivers' options (the paper's FCCaps layer is
    #: 16 x 10 x 16 x 8 whatever ``--n-in`` says); see :func:`op_sizes`
    fixed_sizes: dict = field(default_factory=dict)

    def op_sizes(self, sizes: dict) -> dict:
        """The drivers' common ``sizes`` with this op's fixed ones over them."""
        return {**sizes, **self.fixed_sizes}


@dataclass(frozen=True)
class ModelSpec:
    """A whole model benchmarked by ``bench/model_bench.py`` (training step and inference).

    ``implementations``: name -> ``build(device, dtype) -> (model, wrap)``, where ``model`` is an
    ``nn.Module`` called as ``model(images, target)`` and returning ``(outputs, reconstruction)``,
    and ``wrap(model) -> callable`` compiles it (identity when not compiled); raise :class:`Skip`
    where it cannot run. ``modes`` per implementation default to both.
    """

    name: str
    description: str
    input_shape: tuple[int, ...]  # one example, e.g. (1, 28, 28)
    num_classes: int
    implementations: dict[str, Callable]
    #: ``loss(outputs, target, reconstruction, images)`` of a training step
    loss: Callable
    #: implementation name -> its own loss, where it differs (a baseline's)
    losses: dict[str, Callable] = field(default_factory=dict)
    #: implementation name -> the modes it runs ("train", "inference"); others: both
    modes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    targets: tuple[Target, ...] = ()


_REGISTRY: dict[str, OpSpec] = {}
_MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _MODELS:
        raise ValueError(f"bench model {spec.name!r} is registered twice")
    _MODELS[spec.name] = spec
    return spec


def model_specs() -> dict[str, ModelSpec]:
    """Every registered model, after importing the modules of ``bench/specs/``."""
    specs()
    return dict(_MODELS)


def register(spec: OpSpec) -> OpSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"bench op {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def specs() -> dict[str, OpSpec]:
    """Every registered op, after importing each module of ``bench/specs/`` once."""
    folder = Path(__file__).resolve().parent / "specs"
    for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda m: m.name):
        importlib.import_module(f"specs.{info.name}")
    return dict(_REGISTRY)


def get(name: str) -> OpSpec:
    found = specs()
    if name not in found:
        raise KeyError(f"no bench op {name!r}; registered: {sorted(found)}")
    return found[name]


def implementation_names() -> list[str]:
    """Every implementation name any op declares, eager first, in declaration order."""
    names: list[str] = []
    for spec in specs().values():
        names += [n for n in spec.implementations if n not in names]
    return sorted(names, key=lambda n: n != "eager")
