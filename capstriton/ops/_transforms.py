"""What the ops' autograd does not cover, said plainly instead of failing inside PyTorch."""

from __future__ import annotations

__all__ = ["no_double_backward"]


def no_double_backward(algorithm: str):
    """The autograd formula of a backward op: reached only when a gradient is differentiated
    again (``create_graph=True``, ``torch.autograd.grad`` of a gradient), which the kernels do
    not support. Without it PyTorch says that no formula is registered for an internal op."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"capstriton: double backward (differentiating a gradient, create_graph=True) through "
            f"the triton {algorithm} kernels is not supported; use backend='torch', whose reference "
            "supports every order of differentiation"
        )

    return backward
