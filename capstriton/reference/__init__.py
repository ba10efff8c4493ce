"""The pure-PyTorch reference (``backend="torch"``): the oracle of every test and the CPU path, one
module per algorithm (``squash``, ``dynamic_routing``, ``capsule_routing``, ``efficient_squash``,
``self_attention_routing``), the losses in ``losses``.

Everything here is plain differentiable PyTorch (no custom autograd), so its gradients come from
autograd and are independent of the hand-written backward kernels, and it compiles with
``torch.compile(fullgraph=True)`` on any device. Semantics: DESIGN.md section 1 and the README.

Half-precision inputs are computed in float32 and cast back; float64 stays float64 (the tests
use it as the exact reference). No argument checking here: the public functions in
``capstriton.functional`` validate before they call in.
"""

from ._common import compute_dtype, float_arithmetic
from .capsule_routing import capsule_predictions, capsule_routing
from .dynamic_routing import dynamic_routing
from .efficient_squash import efficient_squash
from .losses import margin_loss, reconstruction_loss
from .self_attention_routing import self_attention_capsule_routing, self_attention_routing
from .squash import squash

__all__ = [
    "squash",
    "dynamic_routing",
    "capsule_predictions",
    "capsule_routing",
    "efficient_squash",
    "self_attention_routing",
    "self_attention_capsule_routing",
    "margin_loss",
    "reconstruction_loss",
    "compute_dtype",
    "float_arithmetic",
]
