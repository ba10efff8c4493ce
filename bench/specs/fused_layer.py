"""Bench op ``layer``: the capsule layer ``ct.capsule_routing`` (the paper's DigitCaps): u
[B, N_in, D_in] and weight [N_in, N_out, D, D_in] -> v [B, N_out, D] (predictions, then routing)."""

from __future__ import annotations

import dataclasses

import torch
from registry import KernelCase, OpSpec, Target, TuneSpec, register

from specs._common import dtype_size, rand, require_triton


def make_inputs(sizes, batch, device, dtype, requires_grad, generator):
    u = rand(generator, (batch, sizes["n_in"], sizes["d_in"]), 0.5, device, dtype, requires_grad)
    w_shape = (sizes["n_in"], sizes["n_out"], sizes["d"], sizes["d_in"])
    return [u, rand(generator, w_shape, 0.05, device, dtype, requires_grad)]


def output_shape(sizes, batch):
    return (batch, sizes["n_out"], sizes["d"])


def build_eager(sizes, device, dtype):
    import capstriton as ct

    iterations, grad = sizes["iterations"], sizes["grad_through_routing"]
    return (lambda u, w: ct.capsule_routing(u, w, iterations, grad_through_routing=grad, backend="torch")), []


def build_compile(sizes, device, dtype):
    from capstriton import reference

    fn = torch.compile(reference.capsule_routing)
    return (lambda u, w: fn(u, w, sizes["iterations"], sizes["grad_through_routing"])), []


def build_fused(sizes, device, dtype):
    """``ct.capsule_routing`` on the triton backend: the fused kernels."""
    import capstriton as ct

    require_triton(device)
    iterations, grad = sizes["iterations"], sizes["grad_through_routing"]
    return (lambda u, w: ct.capsule_routing(u, w, iterations, grad_through_routing=grad, backend="triton")), []


def build_unfused(sizes, device, dtype):
    """The predictions as a PyTorch batched matmul (u_hat in memory), then the routing kernels:
    ``ct.capsule_routing(..., backend="triton", fused=False)``."""
    import capstriton as ct

    require_triton(device)
    iterations, grad = sizes["iterations"], sizes["grad_through_routing"]
    return (
        lambda u, w: ct.capsule_routing(u, w, iterations, grad_through_routing=grad, backend="triton", fused=False)
    ), []


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


# --- launch parameters (bench/tune.py) and kernel launches (bench/kernel_report.py) ----------


def _tuning(overrides):
    from capstriton.ops.fused_layer import FusedTuning

    return FusedTuning(**overrides)


def tuned_call(sizes, overrides):
    from capstriton.ops import fused_layer as ops

    tuning = _tuning(overrides)
    return lambda u, w: ops.capsule_routing(u, w, sizes["iterations"], sizes["grad_through_routing"], tuning)


def launch(sizes, batch, overrides):
    """The launch parameters the knobs resolve to: the passes on tensor cores (what float32 at
    "highest", the tuned dtype, runs; their final pass with its own example tile and batch groups)
    and the IEEE-product passes over tiles of predictions."""
    from capstriton.ops._passes import fused_config
    from capstriton.ops.fused_layer import chunk_capsules, chunked_config, final_tiling, sums_split

    tuning = _tuning(overrides)
    n_in, n_out, d, d_in = sizes["n_in"], sizes["n_out"], sizes["d"], sizes["d_in"]
    examples, _, groups, tiles_per_group = final_tiling(batch, tuning)
    chunked = chunked_config(n_in, d, d_in, batch, tuning)
    return {
        "tensor_cores": dataclasses.asdict(chunked),
        "sums_split": dataclasses.asdict(sums_split(chunked, n_in, n_out, tuning)),
        "final": {"examples": examples, "groups": groups, "tiles_per_group": tiles_per_group,
                  "block_ic": chunk_capsules(tuning.final_chunk, d, d_in),
                  "target_programs_bwd": tuning.target_programs_bwd},
        "ieee": dataclasses.asdict(fused_config(n_in, n_out, d, d_in, batch, tuning, tensor_cores=False)),
    }


# float32 cases at the library's default, "highest" (3xTF32 products), unless named
def _kernel_case(
    n_in, n_out, d, d_in, batch, dtype, shape_set, precision="tf32x3", iterations=3, backward=True
):
    """A kernel case of the layer: its forward and (``backward``) its backward in both gradient
    modes."""

    def run(overrides):
        from capstriton.ops import fused_layer as ops

        tuning = _tuning(overrides).as_list()
        u = torch.empty(batch, n_in, d_in, dtype=dtype, device="cuda")
        w = torch.empty(n_in, n_out, d, d_in, dtype=dtype, device="cuda")
        for grad_through in (True, False) if backward else (True,):
            v, s_saved, vsum_saved = ops.fused_layer_fwd(u, w, iterations, grad_through, precision, tuning)
            if backward:
                ops.fused_layer_bwd(
                    torch.empty_like(v), u, w, s_saved, vsum_saved, iterations, grad_through, precision, tuning
                )

    name = str(dtype).removeprefix("torch.")
    label = f"layer {n_in}x{n_out}x{d}x{d_in} B={batch} R={iterations} {name}"
    return KernelCase(label + (f" {precision}" if dtype == torch.float32 else ""), shape_set, run)


def kernel_cases():
    cases = [_kernel_case(1152, 10, 16, 8, 1024, dt, "digitcaps") for dt in (torch.float16, torch.bfloat16)]
    cases += [_kernel_case(1152, 10, 16, 8, 1024, torch.float32, "digitcaps", p) for p in ("ieee", "tf32", "tf32x3")]
    cases += [
        _kernel_case(2048, 10, 16, 8, 64, torch.bfloat16, "odd"),  # a CIFAR-10 sized layer
        _kernel_case(37, 3, 33, 9, 5, torch.float32, "odd"),
        _kernel_case(7, 1, 5, 1, 3, torch.float32, "odd"),  # one output capsule: 5 outputs, 1D inputs
        _kernel_case(37, 10, 16, 4, 70, torch.float32, "odd"),  # 4D inputs: chunks of 8 capsules
        _kernel_case(37, 10, 16, 4, 70, torch.bfloat16, "odd"),
        _kernel_case(16, 100, 8, 8, 64, torch.float32, "odd"),  # CIFAR-100's classes
        _kernel_case(16, 10, 64, 16, 64, torch.bfloat16, "odd"),  # 64D capsules
        _kernel_case(16, 128, 64, 16, 64, torch.float32, "odd"),  # the largest sizes the issue names
        # the logits in registers (logits_in_registers), forward only (the detached backward's
        # recomputation launches the same variant): the most output capsules it takes, with 16D
        # and with odd 3D input capsules, one output capsule, one input capsule (where triton
        # would specialise N_in to 1)
        _kernel_case(16, 10, 16, 16, 64, torch.bfloat16, "odd", backward=False),
        _kernel_case(37, 10, 16, 3, 70, torch.bfloat16, "odd", backward=False),
        _kernel_case(7, 1, 16, 1, 3, torch.bfloat16, "odd", backward=False),
        _kernel_case(1, 10, 16, 8, 64, torch.bfloat16, "odd", backward=False),
    ]
    return cases


register(
    OpSpec(
        name="layer",
        description="ct.capsule_routing: u [B, N_in, D_in], weight [N_in, N_out, D, D_in] -> v [B, N_out, D]",
        make_inputs=make_inputs,
        output_shape=output_shape,
        implementations={
            "eager": build_eager,
            "compile": build_compile,
            # "triton" is the unfused path, as in the results measured before the fused layer
            "triton": build_unfused,
            "fused": build_fused,
            "module": build_module,
        },
        tune=TuneSpec(
            # the passes on tensor cores (float32 at "highest", half types); tile and num_warps
            # shape only the IEEE-product passes
            knobs={
                "forward": {
                    "fwd_examples": (32, 64),
                    "fwd_chunk": (32, 64),  # 128 spilled; at the paper's D_in 8 it is 64 now (chunked_config)
                    "fwd_warps": (4, 8),
                    "target_programs": (1024, 4096),
                },
                "forward+backward": {
                    "target_programs_bwd": (1024, 2048, 8192),
                    "groups": (4, 8, 16),
                    "final_examples": (16, 32),
                    "final_chunk": (64, 128),
                },
            },
            call=tuned_call,
            launch=launch,
        ),
        kernel_cases=kernel_cases,
        config_keys=(
            "tile", "target_programs", "target_programs_bwd", "groups", "num_warps", "fwd_examples", "fwd_chunk",
            "fwd_warps", "final_examples", "final_chunk", "coupled_programs",
        ),
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
