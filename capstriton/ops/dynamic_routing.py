"""Dynamic routing as ``torch.library.triton_op`` s, with autograd and launch configuration.

    capstriton::dynamic_routing_fwd(u_hat [B, N_in, N_out, D], iterations, grad_through_routing,
        tuning) -> (v [B, N_out, D], s_saved [R, B, N_out, D], vsum_saved [R, B, N_out, D])
    capstriton::dynamic_routing_bwd(grad_v, u_hat, s_saved, vsum_saved, iterations,
        grad_through_routing, tuning) -> grad_u_hat

``tuning`` is :class:`RoutingTuning` as a list of ints, an argument of the op so that a caller
(``bench/tune.py``, the kernel report, the tests) chooses launch parameters explicitly
and torch.compile records them in the graph. The kernels and their algorithm are described in
``capstriton.kernels.dynamic_routing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch.library import triton_op

from ..kernels.common import dynamic_routing_bwd_sum_kernel, dynamic_routing_finalize_kernel
from ..kernels.dynamic_routing import (
    dynamic_routing_bwd_final_kernel,
    dynamic_routing_bwd_reduce_kernel,
    dynamic_routing_fwd_kernel,
)
from ._launch import empty, launch
from ._passes import PassConfig, check_tuning, input_split, rows_per_tile
from ._transforms import no_double_backward

__all__ = [
    "RoutingTuning",
    "RoutingConfig",
    "routing_config",
    "dynamic_routing",
    "dynamic_routing_fwd",
    "dynamic_routing_bwd",
]

_F32 = torch.float32


@dataclass(frozen=True)
class RoutingTuning:
    """The knobs of :func:`routing_config`. The defaults rest on H200 measurements with
    ``bench/tune.py`` and register counts from ``bench/kernel_report.py``
    (``bench/results/nvidia-h200/NOTES.md``, ``bench/results/kernel_report/NOTES.md``)."""

    #: float32 elements of a forward tile [BLOCK_I, BLOCK_J, BLOCK_D]
    tile: int = 1024
    #: float32 elements of a backward tile (more work per capsule, fewer resident warps)
    tile_bwd: int = 2048
    #: programs a forward launch aims for: the input capsules are split across programs while
    #: the batch alone cannot fill the GPU
    target_programs: int = 1024
    #: programs a backward launch aims for
    target_programs_bwd: int = 8192
    #: warps per program of the passes over u_hat; None: from the [N_out, D] block size
    num_warps: int | None = None

    def __post_init__(self):
        check_tuning(self, ("num_warps",))

    def as_list(self) -> list[int]:
        """The op argument (0 stands for ``num_warps=None``)."""
        return [self.tile, self.tile_bwd, self.target_programs, self.target_programs_bwd, self.num_warps or 0]

    @classmethod
    def from_list(cls, values: list[int]) -> RoutingTuning:
        tile, tile_bwd, programs, programs_bwd, warps = values
        return cls(tile, tile_bwd, programs, programs_bwd, warps or None)


@dataclass(frozen=True)
class RoutingConfig:
    """Launch parameters of every routing kernel for one shape and batch size."""

    #: next power of two >= N_out: the output capsules are never split (the softmax couples them)
    block_j: int
    #: next power of two >= D
    block_d: int
    #: warps of the passes over u_hat
    num_warps: int
    #: warps of the per-example kernels that hold only [N_out, D] blocks (finalize, backward sum)
    num_warps_caps: int
    fwd: PassConfig
    bwd: PassConfig


def routing_config(
    n_in: int, n_out: int, dim: int, batch: int, tuning: RoutingTuning | None = None
) -> RoutingConfig:
    """Launch parameters for the routing kernels.

    A tile is ``block_i`` input capsules x ``block_j`` x ``block_d``, ``tuning.tile`` (forward)
    or ``tuning.tile_bwd`` float32 elements; each pass over u_hat keeps a second tile-sized
    accumulator (the forward's and the reduce pass's per-row sums, the final pass's du). The
    passes share only the saved ``s_r`` and ``V_r``, already reduced over the forward's splits,
    so the backward's split is its own.

    Every program also holds a few [N_out, D] blocks (the running sum V, s, ds): 4 warps while
    such a block has at most 512 elements, up to 32 for 64 x 64 capsules; the per-example kernels
    take at most 8 (register counts: bench/results/kernel_report/NOTES.md).
    """
    tuning = tuning or RoutingTuning()
    block_j = triton.next_power_of_2(n_out)
    block_d = triton.next_power_of_2(dim)
    num_warps = tuning.num_warps or min(32, max(4, block_j * block_d // 128))
    cap = triton.next_power_of_2(n_in)
    block_i = rows_per_tile(tuning.tile, block_j * block_d, min(64, cap))
    block_i_bwd = rows_per_tile(tuning.tile_bwd, block_j * block_d, min(64, cap))
    return RoutingConfig(
        block_j=block_j,
        block_d=block_d,
        num_warps=num_warps,
        num_warps_caps=min(8, num_warps),
        fwd=input_split(n_in, block_i, batch, tuning.target_programs),
        bwd=input_split(n_in, block_i_bwd, batch, tuning.target_programs_bwd),
    )


def _saved_buffers(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, n_out, d = u_hat.shape
    shape = (iterations, b, n_out, d)
    return empty(shape, _F32, u_hat.device), empty(shape, _F32, u_hat.device)


def _u_strides(u_hat: torch.Tensor) -> dict[str, int]:
    return dict(zip(("stride_ub", "stride_ui", "stride_uj", "stride_ud"), u_hat.stride(), strict=True))


def _g_strides(g: torch.Tensor) -> dict[str, int]:
    return dict(zip(("stride_gb", "stride_gj", "stride_gd"), g.stride(), strict=True))


@triton_op("capstriton::dynamic_routing_fwd", mutates_args=())
def dynamic_routing_fwd(
    u_hat: torch.Tensor, iterations: int, grad_through_routing: bool, tuning: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_in, n_out, d = u_hat.shape
    v = empty((batch, n_out, d), u_hat.dtype, u_hat.device)
    s_saved, vsum_saved = _saved_buffers(u_hat, iterations)
    if batch == 0:
        return v, s_saved, vsum_saved
    cfg = routing_config(int(n_in), int(n_out), int(d), batch, RoutingTuning.from_list(tuning))
    split = cfg.fwd.split
    partials = [empty((batch, split, n_out, d), _F32, u_hat.device) for _ in range(2)]
    for r in range(iterations):
        launch(
            dynamic_routing_fwd_kernel, (batch, split),
            u_ptr=u_hat, part_in_ptr=partials[(r + 1) % 2], part_out_ptr=partials[r % 2],
            s_buf_ptr=s_saved, vsum_buf_ptr=vsum_saved,
            B=batch, N_in=n_in, N_out=n_out, D=d, SPLIT=split, caps_per_split=cfg.fwd.caps_per_split, r=r,
            **_u_strides(u_hat),
            BLOCK_I=cfg.fwd.block_i, BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, FIRST=r == 0,
            num_warps=cfg.num_warps,
        )
    launch(
        dynamic_routing_finalize_kernel, (batch,),
        part_ptr=partials[(iterations - 1) % 2], s_buf_ptr=s_saved, v_ptr=v,
        B=batch, N_out=n_out, D=d, SPLIT=split, last=iterations - 1,
        BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps_caps,
    )
    return v, s_saved, vsum_saved


@triton_op("capstriton::dynamic_routing_bwd", mutates_args=())
def dynamic_routing_bwd(
    grad_v: torch.Tensor,
    u_hat: torch.Tensor,
    s_saved: torch.Tensor,
    vsum_saved: torch.Tensor,
    iterations: int,
    grad_through_routing: bool,
    tuning: list[int],
) -> torch.Tensor:
    batch, n_in, n_out, d = u_hat.shape
    du = empty((batch, n_in, n_out, d), u_hat.dtype, u_hat.device)
    if batch == 0:
        return du
    cfg = routing_config(int(n_in), int(n_out), int(d), batch, RoutingTuning.from_list(tuning))
    split = cfg.bwd.split
    ds_saved = empty(s_saved.shape, _F32, u_hat.device)
    dpartials = empty((batch, split, n_out, d), _F32, u_hat.device)  # one step's, reused
    dv_sum = empty((batch, n_out, d), _F32, u_hat.device)  # sum of the later steps' dV
    blocks = {"BLOCK_I": cfg.bwd.block_i, "BLOCK_J": cfg.block_j, "BLOCK_D": cfg.block_d}
    shape = {"B": batch, "N_in": n_in, "N_out": n_out, "D": d, "caps_per_split": cfg.bwd.caps_per_split}
    # dv_r, the gradient reaching v_r: the output gradient for the last step, the running sum of
    # the later steps' dV for the others (chosen here, so no kernel selects at run time)
    dv_in = grad_v
    if grad_through_routing:
        for r in range(iterations - 1, 0, -1):
            launch(
                dynamic_routing_bwd_reduce_kernel, (batch, split),
                u_ptr=u_hat, dv_ptr=dv_in, s_buf_ptr=s_saved, vsum_buf_ptr=vsum_saved,
                ds_buf_ptr=ds_saved, dpart_ptr=dpartials, SPLIT=split, r=r, **shape,
                **_u_strides(u_hat), **_g_strides(dv_in), **blocks, num_warps=cfg.num_warps,
            )
            launch(
                dynamic_routing_bwd_sum_kernel, (batch,),
                dpart_ptr=dpartials, dvsum_ptr=dv_sum, B=batch, N_out=n_out, D=d, SPLIT=split,
                BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, FIRST=r == iterations - 1,
                num_warps=cfg.num_warps_caps,
            )
            dv_in = dv_sum
    launch(
        dynamic_routing_bwd_final_kernel, (batch, split),
        u_ptr=u_hat, dv_ptr=dv_in, s_buf_ptr=s_saved, vsum_buf_ptr=vsum_saved, ds_buf_ptr=ds_saved,
        du_ptr=du, R=iterations, **shape, **_u_strides(u_hat), **_g_strides(dv_in), **blocks,
        GRAD_THROUGH=grad_through_routing, num_warps=cfg.num_warps,
    )
    return du


def _setup_context(ctx, inputs, output):
    u_hat, iterations, grad_through_routing, tuning = inputs
    _, s_saved, vsum_saved = output
    ctx.save_for_backward(u_hat, s_saved, vsum_saved)
    ctx.iterations, ctx.grad_through_routing, ctx.tuning = iterations, grad_through_routing, tuning


def _backward(ctx, grad_v, _grad_s_saved, _grad_vsum_saved):
    u_hat, s_saved, vsum_saved = ctx.saved_tensors
    if grad_v is None:
        return None, None, None, None
    du = dynamic_routing_bwd(
        grad_v, u_hat, s_saved, vsum_saved, ctx.iterations, ctx.grad_through_routing, ctx.tuning
    )
    return du, None, None, None


dynamic_routing_fwd.register_autograd(_backward, setup_context=_setup_context)
dynamic_routing_bwd.register_autograd(no_double_backward("dynamic routing"))


def dynamic_routing(
    u_hat: torch.Tensor,
    iterations: int,
    grad_through_routing: bool,
    tuning: RoutingTuning | None = None,
) -> torch.Tensor:
    """Routing with the Triton kernels: ``u_hat`` [B, N_in, N_out, D] -> ``v`` [B, N_out, D]
    (validated by capstriton.functional); ``tuning`` overrides the launch parameters."""
    tuning = (tuning or RoutingTuning()).as_list()
    return dynamic_routing_fwd(u_hat, iterations, grad_through_routing, tuning)[0]
