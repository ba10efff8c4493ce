"""Bench ops ``attention`` and ``fccaps``: the capsule layer with self-attention routing,
``ct.self_attention_capsule_routing`` (Efficient-CapsNet's FCCaps): u [B, N_in, D_in], weight
[N_in, N_out, D, D_in] and bias [N_in, N_out] -> v [B, N_out, D]. ``attention`` takes the drivers'
sizes (a large layer, 1152 x 10 x 16 x 8, by default); ``fccaps`` is the paper's MNIST layer,
16 x 10 x 16 x 8, whatever the size options say."""

from __future__ import annotations

import torch
from registry import KernelCase, OpSpec, Target, TuneSpec, register

from specs._common import dtype_size, public_function, rand
from specs.fused_layer import _tuning, launch  # the same launch configuration (fused_config)


def make_inputs(sizes, batch, device, dtype, requires_grad, generator):
    n_in, n_out, d, d_in = sizes["n_in"], sizes["n_out"], sizes["d"], sizes["d_in"]
    u = rand(generator, (batch, n_in, d_in), 0.5, device, dtype, requires_grad)
    w = rand(generator, (n_in, n_out, d, d_in), (2.0 / (n_out * n_in * d_in)) ** 0.5, device, dtype, requires_grad)
    return [u, w, rand(generator, (n_in, n_out), 0.1, device, dtype, requires_grad)]


def output_shape(sizes, batch):
    return (batch, sizes["n_out"], sizes["d"])


def build_compile(sizes, device, dtype):
    from capstriton import reference

    return torch.compile(reference.self_attention_capsule_routing), []


def _public(sizes, backend):
    """``backend="torch"`` (eager) or ``"triton"`` (the predictions computed on chip, never stored)."""
    import capstriton as ct

    return lambda u, w, b: ct.self_attention_capsule_routing(u, w, b, backend=backend)


def build_module(sizes, device, dtype):
    """torch.compile of the whole SelfAttentionCapsules module with backend="auto" (the module owns
    its weight and bias: those inputs are ignored, their gradients come as parameters)."""
    import capstriton as ct

    layer = ct.nn.SelfAttentionCapsules(sizes["n_in"], sizes["d_in"], sizes["n_out"], sizes["d"], backend="auto")
    layer = layer.to(device=device, dtype=dtype)
    compiled = torch.compile(layer)
    return (lambda u, w, b: compiled(u)), list(layer.parameters())


def min_bytes_per_example(sizes, dtype, mode, batch):
    """u read once per example, the weight and the bias once per batch (their gradients and u's
    written once in forward+backward)."""
    size = dtype_size(dtype)
    n_in, n_out = sizes["n_in"], sizes["n_out"]
    per_example = n_in * sizes["d_in"] * size + (n_in * n_out * (sizes["d"] * sizes["d_in"] + 1)) * size / batch
    return per_example * (2 if mode == "forward+backward" else 1)


def flops_per_example(sizes, mode):
    """Predictions 2 N_in N_out D D_in; S, the logits and s about 5 N_in N_out D (the softmax's
    few per coefficient are negligible); the backward about twice the forward."""
    n = sizes["n_in"] * sizes["n_out"] * sizes["d"]
    forward = 2 * n * sizes["d_in"] + 5 * n
    return forward * (3 if mode == "forward+backward" else 1)


# --- launch parameters (bench/tune.py) and kernel launches (bench/kernel_report.py) ----------


def tuned_call(sizes, overrides):
    from capstriton.ops import self_attention_routing as ops

    tuning = _tuning(overrides)
    return lambda u, w, b: ops.self_attention_capsule_routing(u, w, b, tuning)


# float32 cases at the library's default, "highest" (3xTF32 products), unless named
def _kernel_case(n_in, n_out, d, d_in, batch, dtype, shape_set, precision="tf32x3", form="layer", bias=True):
    """The forward and backward launches of the layer (``form="layer"``) or of the routing on
    predictions u_hat [B, N_in, N_out, D] (``form="routing"``)."""

    def run(overrides):
        from capstriton.ops import self_attention_routing as ops

        tuning = _tuning(overrides).as_list()
        b = torch.empty(n_in, n_out, dtype=dtype, device="cuda") if bias else None
        if form == "layer":
            u = torch.empty(batch, n_in, d_in, dtype=dtype, device="cuda")
            w = torch.empty(n_in, n_out, d, d_in, dtype=dtype, device="cuda")
            v, total, s = ops.self_attention_layer_fwd(u, w, b, precision, tuning)
            ops.self_attention_layer_bwd(torch.empty_like(v), u, w, b, total, s, precision, tuning)
        else:
            u_hat = torch.empty(batch, n_in, n_out, d, dtype=dtype, device="cuda")
            v, total, s = ops.self_attention_routing_fwd(u_hat, b, tuning)
            ops.self_attention_routing_bwd(torch.empty_like(v), u_hat, b, total, s, tuning)

    name = str(dtype).removeprefix("torch.")
    shape = f"{n_in}x{n_out}x{d}x{d_in}" if form == "layer" else f"{n_in}x{n_out}x{d}"
    label = f"attention-{form} {shape} B={batch} {name}"
    label += f" {precision}" if dtype == torch.float32 and form == "layer" else ""
    return KernelCase(label + ("" if bias else " no-bias"), shape_set, run)


def kernel_cases():
    cases = []
    for n_in in (1152, 16):  # the large layer and the paper's FCCaps
        cases += [_kernel_case(n_in, 10, 16, 8, 1024, dt, "digitcaps") for dt in (torch.float16, torch.bfloat16)]
        precisions = ("ieee", "tf32", "tf32x3")
        cases += [_kernel_case(n_in, 10, 16, 8, 1024, torch.float32, "digitcaps", p) for p in precisions]
    cases += [
        _kernel_case(1152, 10, 16, 1, 1024, torch.float32, "digitcaps", form="routing"),
        _kernel_case(1152, 10, 16, 1, 1024, torch.bfloat16, "digitcaps", form="routing"),
        _kernel_case(37, 3, 33, 9, 5, torch.float32, "odd"),
        _kernel_case(7, 1, 5, 1, 3, torch.float32, "odd", bias=False),
        _kernel_case(16, 100, 8, 8, 64, torch.bfloat16, "odd"),
        _kernel_case(37, 3, 33, 1, 5, torch.float32, "odd", form="routing", bias=False),
    ]
    return cases


TUNE = TuneSpec(
    knobs={
        "forward": {"tile": (2048, 4096, 8192), "target_programs": (256, 1024, 4096), "num_warps": (None, 4)},
        "forward+backward": {"target_programs_bwd": (1024, 2048, 8192), "groups": (4, 8, 16), "num_warps": (None,)},
    },
    call=tuned_call,
    launch=launch,
)
IMPLEMENTATIONS = {**public_function(_public), "compile": build_compile, "module": build_module}
CONFIG_KEYS = ("tile", "target_programs", "target_programs_bwd", "groups", "num_warps")
DESCRIPTION = (
    "ct.self_attention_capsule_routing: u [B, N_in, D_in], weight [N_in, N_out, D, D_in], bias [N_in, N_out]"
    " -> v [B, N_out, D]"
)

# the two ops differ in their sizes only: the same layer at the drivers' sizes, and at the paper's
_SHARED = dict(
    make_inputs=make_inputs,
    output_shape=output_shape,
    implementations=IMPLEMENTATIONS,
    tune=TUNE,
    config_keys=CONFIG_KEYS,
    min_bytes_per_example=min_bytes_per_example,
    flops_per_example=flops_per_example,
)
register(
    OpSpec(
        name="attention",
        description=DESCRIPTION + " (the drivers' sizes: 1152 x 10 x 16 x 8 by default)",
        kernel_cases=kernel_cases,
        targets=(Target("forward", "triton", "speedup_vs_eager", 5.0, "issue 15 (the large layer, B = 1024)"),),
        **_SHARED,
    )
)
register(
    OpSpec(
        name="fccaps",
        description=DESCRIPTION + " (Efficient-CapsNet's MNIST layer, always 16 x 10 x 16 x 8)",
        fixed_sizes={"n_in": 16, "n_out": 10, "d": 16, "d_in": 8},
        **_SHARED,
    )
)
