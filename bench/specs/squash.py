"""Bench op ``squash``: ``ct.squash`` of capsules s [B, N_in, D] (PrimaryCaps rows by default).
Not in the default sweep (a memory-bound elementwise op); its kernel cases feed the kernel report."""

from __future__ import annotations

import torch
from registry import KernelCase, OpSpec, register

from specs._common import dtype_size, public_function, rand


def make_inputs(sizes, batch, device, dtype, requires_grad, generator):
    return [rand(generator, (batch, sizes["n_in"], sizes["d_in"]), 1.0, device, dtype, requires_grad)]


def output_shape(sizes, batch):
    return (batch, sizes["n_in"], sizes["d_in"])


def _squash(sizes, backend):
    import capstriton as ct

    return lambda s: ct.squash(s, backend=backend)


def build_compile(sizes, device, dtype):
    from capstriton import reference

    fn = torch.compile(reference.squash)
    return (lambda s: fn(s)), []


def min_bytes_per_example(sizes, dtype, mode, batch):
    """s read and v written (forward+backward: also the gradient read and ds written)."""
    return 2 * sizes["n_in"] * sizes["d_in"] * dtype_size(dtype) * (2 if mode == "forward+backward" else 1)


def flops_per_example(sizes, mode):
    return 6 * sizes["n_in"] * sizes["d_in"] * (2 if mode == "forward+backward" else 1)


def _kernel_case(shape, dtype, shape_set):
    def run(overrides):
        from capstriton.ops.squash import squash_bwd, squash_fwd

        s = torch.empty(shape, dtype=dtype, device="cuda")
        squash_fwd(s)
        squash_bwd(torch.empty_like(s), s)

    name = str(dtype).removeprefix("torch.")
    return KernelCase(f"squash {'x'.join(map(str, shape))} {name}", shape_set, run)


def kernel_cases():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    cases = [_kernel_case((64, 1152, 8), dt, "digitcaps") for dt in dtypes]  # PrimaryCaps rows
    cases += [_kernel_case((64, 10, 16), dt, "digitcaps") for dt in dtypes]  # DigitCaps outputs
    cases += [
        _kernel_case((1000, 1), torch.float32, "odd"),
        _kernel_case((999, 256), torch.float32, "odd"),
        _kernel_case((37, 33), torch.float16, "odd"),
    ]
    return cases


register(
    OpSpec(
        name="squash",
        description="ct.squash of s [B, N_in, D_in] over the last dimension",
        make_inputs=make_inputs,
        output_shape=output_shape,
        implementations={**public_function(_squash), "compile": build_compile},
        min_bytes_per_example=min_bytes_per_example,
        flops_per_example=flops_per_example,
        default=False,
        kernel_cases=kernel_cases,
    )
)
