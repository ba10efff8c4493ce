"""Bench op ``routing``: ``ct.dynamic_routing`` alone, on predictions u_hat [B, N_in, N_out, D]."""

from __future__ import annotations

import dataclasses

import torch
from registry import KernelCase, OpSpec, Target, TuneSpec, register

from specs._common import dtype_size, public_function, rand


def make_inputs(sizes, batch, device, dtype, requires_grad, generator):
    shape = (batch, sizes["n_in"], sizes["n_out"], sizes["d"])
    return [rand(generator, shape, 0.1, device, dtype, requires_grad)]


def output_shape(sizes, batch):
    return (batch, sizes["n_out"], sizes["d"])


def _routing(sizes, backend):
    import capstriton as ct

    iterations, grad = sizes["iterations"], sizes["grad_through_routing"]
    return lambda u_hat: ct.dynamic_routing(u_hat, iterations, grad_through_routing=grad, backend=backend)


def build_compile(sizes, device, dtype):
    from capstriton import reference

    fn = torch.compile(reference.dynamic_routing)
    return (lambda u_hat: fn(u_hat, sizes["iterations"], sizes["grad_through_routing"])), []


def min_bytes_per_example(sizes, dtype, mode, batch):
    """u_hat read once (and its gradient written once in forward+backward)."""
    u_hat = sizes["n_in"] * sizes["n_out"] * sizes["d"] * dtype_size(dtype)
    return u_hat * (2 if mode == "forward+backward" else 1)


def flops_per_example(sizes, mode):
    """Per iteration a weighted sum over input capsules (2 N_in N_out D) and, but for the last,
    the agreements u_hat . v (2 N_in N_out D): (4R - 2) N_in N_out D, plus softmax and squash
    (small). The backward replays every iteration with about twice that work."""
    forward = (4 * sizes["iterations"] - 2) * sizes["n_in"] * sizes["n_out"] * sizes["d"]
    return forward * (3 if mode == "forward+backward" else 1)


# --- launch parameters (bench/tune.py) and kernel launches (bench/kernel_report.py) ----------


def _tuning(overrides):
    from capstriton.ops.dynamic_routing import RoutingTuning

    return RoutingTuning(**overrides)


def tuned_call(sizes, overrides):
    from capstriton.ops import dynamic_routing as ops

    tuning = _tuning(overrides)
    return lambda u_hat: ops.dynamic_routing(u_hat, sizes["iterations"], sizes["grad_through_routing"], tuning)


def launch(sizes, batch, overrides):
    from capstriton.ops.dynamic_routing import routing_config

    return dataclasses.asdict(routing_config(sizes["n_in"], sizes["n_out"], sizes["d"], batch, _tuning(overrides)))


def _kernel_case(n_in, n_out, d, batch, dtype, shape_set, iterations=3):
    def run(overrides):
        from capstriton.ops import dynamic_routing as ops

        tuning = _tuning(overrides).as_list()
        u = torch.empty(batch, n_in, n_out, d, dtype=dtype, device="cuda")
        for grad_through in (True, False):
            v, s_saved, vsum_saved = ops.dynamic_routing_fwd(u, iterations, grad_through, tuning)
            # a contiguous incoming gradient, as from the margin loss
            ops.dynamic_routing_bwd(torch.empty_like(v), u, s_saved, vsum_saved, iterations, grad_through, tuning)

    name = str(dtype).removeprefix("torch.")
    return KernelCase(f"routing {n_in}x{n_out}x{d} B={batch} R={iterations} {name}", shape_set, run)


def kernel_cases():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    cases = [_kernel_case(1152, 10, 16, b, dt, "digitcaps") for dt in dtypes for b in (1, 64, 1024)]
    cases += [
        _kernel_case(37, 3, 33, 5, torch.float32, "odd"),
        _kernel_case(7, 2, 5, 3, torch.float32, "odd"),
        _kernel_case(37, 3, 33, 5, torch.bfloat16, "odd"),
        _kernel_case(1152, 10, 1, 64, torch.float32, "odd"),
        _kernel_case(1, 1, 256, 2, torch.float32, "odd"),
        _kernel_case(64, 64, 64, 3, torch.float32, "odd"),  # the largest N_out and D promised
    ]
    return cases


register(
    OpSpec(
        name="routing",
        description="ct.dynamic_routing on u_hat [B, N_in, N_out, D] -> v [B, N_out, D]",
        make_inputs=make_inputs,
        output_shape=output_shape,
        implementations={**public_function(_routing), "compile": build_compile},
        min_bytes_per_example=min_bytes_per_example,
        flops_per_example=flops_per_example,
        targets=(
            Target("forward", "triton", "speedup_vs_eager", 5.0, "DESIGN.md section 5"),
            Target("forward", "triton", "speedup_vs_compile", 2.0, "DESIGN.md section 5"),
            Target("forward+backward", "triton", "speedup_vs_eager", 3.0, "issue 3"),
        ),
        tune=TuneSpec(
            knobs={
                "forward": {"tile": (1024, 2048, 4096), "target_programs": (1024, 8192), "num_warps": (None,)},
                "forward+backward": {
                    "tile_bwd": (512, 1024, 2048),
                    "target_programs_bwd": (1024, 8192),
                    "num_warps": (None,),
                },
            },
            call=tuned_call,
            launch=launch,
        ),
        kernel_cases=kernel_cases,
        config_keys=("tile", "tile_bwd", "target_programs", "target_programs_bwd", "num_warps"),
    )
)
