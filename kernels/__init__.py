"""Triton kernels of capstriton (installed as ``capstriton.kernels``): ``@triton.jit`` code only.

``common`` holds the jitted helpers every algorithm shares and the kernels several algorithms
launch (sums of a pass's partials, named after the algorithm that introduced them); every other
module is one algorithm (``squash``, ``dynamic_routing``, ...), its kernels named after it.
Launch configuration, autograd and the ``torch.library`` registration live in ``capstriton.ops``.
"""
