"""capstriton: capsule networks for PyTorch with dynamic and self-attention routing as Triton kernels.

    import capstriton as ct
    v = ct.dynamic_routing(u_hat, iterations=3)      # u_hat [B, N_in, N_out, D] -> v [B, N_out, D]
    v = ct.capsule_routing(u, weight)                # u [B, N_in, D_in], weight [N_in, N_out, D_out, D_in]
    model = ct.models.CapsNet()                      # the paper's MNIST CapsNet
"""

from . import models, nn, reference
from .functional import (
    capsule_routing,
    dynamic_routing,
    efficient_squash,
    margin_loss,
    reconstruction_loss,
    self_attention_capsule_routing,
    self_attention_routing,
    squash,
)

__version__ = "0.1.0"

__all__ = [
    "squash",
    "dynamic_routing",
    "capsule_routing",
    "efficient_squash",
    "self_attention_routing",
    "self_attention_capsule_routing",
    "margin_loss",
    "reconstruction_loss",
    "nn",
    "models",
    "reference",
]
