"""The Triton kernels as ``torch.library.triton_op`` s with autograd, one module per algorithm
(its ops, autograd and launch configuration); ``_launch`` holds the shared launch helpers,
``_passes`` the launch configuration that more than one algorithm's passes use.

Each op's body launches kernels through ``wrap_triton``, so ``torch.compile(fullgraph=True)``
traces straight through it (the graph holds a ``triton_kernel_wrapper`` node) and inductor can
schedule it; autograd is attached with ``register_autograd``, and the backward ops are
``triton_op`` s too. Inputs are validated by ``capstriton.functional`` before they get here.
Each module's public function has the signature of its ``capstriton.reference`` counterpart:
they are the two columns of ``capstriton.functional``'s backend table.
"""

from . import dynamic_routing, fused_layer, self_attention_routing, squash

__all__ = ["squash", "dynamic_routing", "fused_layer", "self_attention_routing"]
