"""Bench op ``layer``: the capsule layer ``ct.capsule_routing`` (the paper's DigitCaps): u
[B, N_in, D_in] and weight [N_in, N_out, D, D_in] -> v [B, N_out, D] (predictions, then routing)."""

from __future__ import annotations

import torch
from registry import OpSpec, Skip, Target, register

from specs._common import dtype_size, public_function, rand


def make_inputs(sizes, batch, device, dtype, requires_grad, generator):
    u = rand(generator, (batch, sizes["n_in"], sizes["d_in"]), 0.5, device, dtype, requires_grad)
    w_shape = (sizes["n_in"], sizes["n_out"], sizes["d"], sizes["d_in"])
    return [u, rand(generator, w_shape, 0.05, device, dtype, requires_grad)]


def output_shape(sizes, batch):
    return (batch, sizes["n_out"], sizes["d"])


def _layer(sizes, backend):
    import capstriton as ct

    iterations, grad = sizes["iterations"], sizes["grad_through_routing"]
    return lambda u, w: ct.capsule_routing(u, w, iterations, grad_through_routing=grad, backend=backend)


def build_compile(sizes, device, dtype):
    from capstriton import reference

    fn = torch.compile(reference.capsule_routing)
    return (lambda u, w: fn(u, w, sizes["iterations"], sizes["grad_through_routing"])), []


def build_fused(sizes, device, dtype):
    raise Skip("not implemented (the fused layer kernels are issue 13)")


def build_module(sizes, device, dtype):
    """torch.compile of the whole RoutingCapsules module with backend="auto" (the module owns its
    weight, so it takes u alone: the weight input is ignored, its gradient comes as a parameter)."""
    import capstriton as ct

    layer = ct.nn.RoutingCapsules(
        sizes["n_in"], sizes["d_in"], sizes["n_out"], sizes["d"], sizes["iterations"],
        sizes["grad_through_routing"], backend="auto",
    ).to(device=device, dtype=dtype)
    compiled = torch.compile(layer)
    return (lambda u, w: compiled(u)), [layer.weight]


def min_bytes_per_example(sizes, dtype, mode, batch):
    """u read once per example and the weight once per batch (its gradient and u's written once
    in forward+backward)."""
    size = dtype_size(dtype)
    per_example = sizes["n_in"] * sizes["d_in"] * size
    per_example += sizes["n_in"] * sizes["n_out"] * sizes["d"] * sizes["d_in"] * size / batch
    return per_example * (2 if mode == "forward+backward" else 1)


def flops_per_example(sizes, mode):
    """Predictions 2 N_in N_out D D_in, then routing (4R - 2) N_in N_out D; the backward about
    twice the forward (a fused layer recomputes the predictions in every pass: DESIGN.md 5)."""
    n = sizes["n_in"] * sizes["n_out"] * sizes["d"]
    forward = 2 * n * sizes["d_in"] + (4 * sizes["iterations"] - 2) * n
    return forward * (3 if mode == "forward+backward" else 1)


register(
    OpSpec(
        name="layer",
        description="ct.capsule_routing: u [B, N_in, D_in], weight [N_in, N_out, D, D_in] -> v [B, N_out, D]",
        make_inputs=make_inputs,
        output_shape=output_shape,
        implementations={
            **public_function(_layer),
            "compile": build_compile,
            "fused": build_fused,
            "module": build_module,
        },
        min_bytes_per_example=min_bytes_per_example,
        flops_per_example=flops_per_example,
        targets=(
            Target("forward", "fused", "examples_per_s", 4e6, "DESIGN.md section 5", "float32"),
            Target("forward", "fused", "examples_per_s", 10e6, "DESIGN.md section 5", "bfloat16"),
            Target("forward+backward", "fused", "speedup_vs_eager", 10.0, "DESIGN.md section 5"),
            Target("forward+backward", "fused", "memory_fraction_of_eager", 0.25, "DESIGN.md section 5"),
        ),
    )
)
