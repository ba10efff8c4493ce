"""Self-attention routing (Efficient-CapsNet) as ``torch.library.triton_op`` s, with autograd:

    capstriton::self_attention_routing_fwd(u_hat [B, N_in, N_out, D], bias? [N_in, N_out], tuning)
        -> (v [B, N_out, D], S [B, N_out, D], s [B, N_out, D])
    capstriton::self_attention_routing_bwd(grad_v, u_hat, bias?, S, s, tuning) -> (du_hat, dbias)
    capstriton::self_attention_layer_fwd(u [B, N_in, D_in], weight [N_in, N_out, D, D_in], bias?,
        precision, tuning) -> (v, S, s)
    capstriton::self_attention_layer_bwd(grad_v, u, weight, bias?, S, s, precision, tuning)
        -> (du, dweight, dbias)

The layer form computes the predictions on chip and never stores them, with the fused layer's
launch configuration (:func:`capstriton.ops._passes.fused_config`: tiles, splits, batch
groups, tensor cores) and precision rule (``precision`` from
``torch.get_float32_matmul_precision()``: "tf32x3" at "highest", "tf32" at "high"/"medium"). A
training step saves the inputs and the two [B, N_out, D] float32 sums S and s. ``dbias`` of a
call without a bias is an empty tensor.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
from torch.library import triton_op

from ..kernels.common import dynamic_routing_bwd_sum_kernel, fused_layer_bwd_dw_sum_kernel
from ..kernels.self_attention_routing import (
    self_attention_routing_bwd_ds_kernel,
    self_attention_routing_bwd_final_kernel,
    self_attention_routing_bwd_reduce_kernel,
    self_attention_routing_finalize_kernel,
    self_attention_routing_fwd_kernel,
)
from ._launch import empty, launch
from ._passes import (
    FusedConfig,
    FusedTuning,
    float16_as_float32,
    fused_config,
    fused_constexprs,
    matmul_precision,
    uses_tensor_cores,
)
from ._transforms import no_double_backward

__all__ = [
    "self_attention_routing",
    "self_attention_capsule_routing",
    "self_attention_routing_fwd",
    "self_attention_routing_bwd",
    "self_attention_layer_fwd",
    "self_attention_layer_bwd",
]

_F32 = torch.float32


def _config(u: torch.Tensor, weight: torch.Tensor | None, u_hat: torch.Tensor | None, precision: str, tuning):
    """The launch configuration, and the u / weight / u_hat tensors each kernel argument gets (the
    form not used passes a placeholder it never reads)."""
    if u_hat is not None:
        batch, n_in, n_out, d = u_hat.shape
        # predictions are loaded, not multiplied: the tile's products need no tensor cores
        cfg = fused_config(n_in, n_out, d, 1, batch, FusedTuning.from_list(tuning), tensor_cores=False)
        return cfg, u_hat, u_hat, u_hat
    n_in, n_out, d, d_in = weight.shape
    cfg = fused_config(n_in, n_out, d, d_in, u.shape[0], FusedTuning.from_list(tuning), uses_tensor_cores(u, precision))
    return cfg, u, weight, u


def _strides(u, weight, u_hat, bias) -> dict[str, int]:
    from_u = u.dim() == 3
    su = u.stride() if from_u else (0, 0, 0)
    sw = weight.stride() if from_u else (0, 0, 0, 0)
    sh = (0, 0, 0, 0) if from_u else u_hat.stride()
    sb = bias.stride() if bias is not None else (0, 0)
    names = (
        *("stride_ub", "stride_ui", "stride_uk", "stride_wi", "stride_wj", "stride_wd", "stride_wk"),
        *("stride_hb", "stride_hi", "stride_hj", "stride_hd", "stride_bi", "stride_bj"),
    )
    return dict(zip(names, (*su, *sw, *sh, *sb), strict=True))


def _constexprs(cfg: FusedConfig, x: torch.Tensor, precision: str, from_u: bool, has_bias: bool) -> dict:
    # the u_hat form's configuration (D_in 1, no tensor cores) already gives BLOCK_K 1, no tl.dot
    return {**fused_constexprs(cfg, x.dtype, precision), "FROM_U": from_u, "HAS_BIAS": has_bias}


def _forward(x, weight, bias, precision: str, tuning: list[int]):
    """Both forms' forward: ``x`` is u (with ``weight``) or u_hat (``weight`` None)."""
    from_u = weight is not None
    batch = x.shape[0]
    n_in, n_out, d = (weight.shape[:3] if from_u else x.shape[1:])
    v = empty((batch, n_out, d), x.dtype, x.device)
    total, s = empty((batch, n_out, d), _F32, x.device), empty((batch, n_out, d), _F32, x.device)
    if batch == 0:
        return v, total, s
    cfg, u_arg, w_arg, h_arg = _config(x if from_u else None, weight, None if from_u else x, precision, tuning)
    split = cfg.fwd.split
    partials = [empty((batch, split, n_out, d), _F32, x.device) for _ in range(2)]
    common = dict(
        u_ptr=u_arg, w_ptr=w_arg, uh_ptr=h_arg, bias_ptr=bias if bias is not None else x,
        B=batch, N_in=n_in, N_out=n_out, D=d, D_in=x.shape[2] if from_u else 1, SPLIT=split,
        caps_per_split=cfg.fwd.caps_per_split, inv_sqrt_d=1.0 / math.sqrt(d),
        **_strides(x, weight, x, bias), **_constexprs(cfg, x, precision, from_u, bias is not None),
    )
    for phase in (0, 1):
        launch(
            self_attention_routing_fwd_kernel, (cfg.tiles, split),
            part_in_ptr=partials[0], part_out_ptr=partials[phase], total_ptr=total, PHASE=phase, **common,
        )
    launch(
        self_attention_routing_finalize_kernel, (batch,),
        part_ptr=partials[1], s_ptr=s, v_ptr=v, B=batch, N_out=n_out, D=d, SPLIT=split,
        BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps_caps,
    )
    return v, total, s


def _backward(grad_v, x, weight, bias, total, s, precision: str, tuning: list[int]):
    """Both forms' backward: (dx, dweight or None, dbias or an empty tensor)."""
    from_u = weight is not None
    batch = x.shape[0]
    n_in, n_out, d = (weight.shape[:3] if from_u else x.shape[1:])
    dx = empty(x.shape, x.dtype, x.device)
    dw = empty(weight.shape, weight.dtype, weight.device) if from_u else None
    dbias = empty(bias.shape, bias.dtype, bias.device) if bias is not None else torch.empty(0, device=x.device)
    if batch == 0:
        return dx, None if dw is None else dw.zero_(), dbias.zero_()
    cfg, u_arg, w_arg, h_arg = _config(x if from_u else None, weight, None if from_u else x, precision, tuning)
    ds = empty((batch, n_out, d), _F32, x.device)
    launch(
        self_attention_routing_bwd_ds_kernel, (batch,),
        dv_ptr=grad_v, s_ptr=s, ds_ptr=ds, B=batch, N_out=n_out, D=d,
        stride_gb=grad_v.stride(0), stride_gj=grad_v.stride(1), stride_gd=grad_v.stride(2),
        BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps_caps,
    )
    strides = _strides(x, weight, x, bias)
    d_in = x.shape[2] if from_u else 1
    sizes = dict(B=batch, N_in=n_in, N_out=n_out, D=d, D_in=d_in, inv_sqrt_d=1.0 / math.sqrt(d))
    inputs = dict(u_ptr=u_arg, w_ptr=w_arg, uh_ptr=h_arg, bias_ptr=bias if bias is not None else x)
    split = cfg.bwd.split
    dparts = empty((batch, split, n_out, d), _F32, x.device)
    launch(
        self_attention_routing_bwd_reduce_kernel, (cfg.tiles, split),
        total_ptr=total, ds_ptr=ds, dpart_ptr=dparts, SPLIT=split, caps_per_split=cfg.bwd.caps_per_split,
        **inputs, **sizes, **strides, **_constexprs(cfg, x, precision, from_u, bias is not None),
    )
    dtotal = empty((batch, n_out, d), _F32, x.device)
    launch(
        dynamic_routing_bwd_sum_kernel, (batch,),
        dpart_ptr=dparts, dvsum_ptr=dtotal, B=batch, N_out=n_out, D=d, SPLIT=split,
        BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, FIRST=True, num_warps=cfg.num_warps_caps,
    )
    # the final pass multiplies float32 in IEEE float32 whatever the setting (with TF32 or 3xTF32
    # dots on its tiles of predictions it spilled; the fused layer's final pass works in u's space)
    final, *_ = _config(x if from_u else None, weight, None if from_u else x, "ieee", tuning)
    if from_u and not final.use_dot and final.block_j * final.block_d >= 256:
        # rank-one products with blocks of 256 outputs or more: half the tile (16 examples of
        # 37 x 3 x 33 capsules spilled 16 bytes on sm_80 with triton 3.9; 8 do not)
        halved = FusedTuning.from_list(tuning)
        halved = dataclasses.replace(halved, tile=max(halved.tile // 2, 1)).as_list()
        final, *_ = _config(x, weight, None, "ieee", halved)
    final_consts = _constexprs(final, x, "ieee", from_u, bias is not None)
    part_shape = (final.groups, *weight.shape) if from_u else (1,)
    zeroed = from_u and not final.use_dot  # the rank-one path accumulates its part in place
    dw_part = torch.zeros(part_shape, dtype=_F32, device=x.device) if zeroed else empty(part_shape, _F32, x.device)
    dbias_part = empty((final.groups, n_in, n_out) if bias is not None else (1,), _F32, x.device)
    launch(
        self_attention_routing_bwd_final_kernel, (final.final.split, final.groups),
        total_ptr=total, ds_ptr=ds, dtotal_ptr=dtotal, du_ptr=dx, dw_part_ptr=dw_part, dbias_part_ptr=dbias_part,
        caps_per_split=final.final.caps_per_split, tiles_per_group=final.tiles_per_group,
        **inputs, **sizes, **strides, **final_consts, HALF=from_u and x.dtype != _F32,
    )
    for part, out in ((dw_part, dw), (dbias_part, dbias if bias is not None else None)):
        if out is not None:
            launch(
                fused_layer_bwd_dw_sum_kernel, (triton.cdiv(out.numel(), 1024),),
                dw_part_ptr=part, dw_ptr=out, numel=out.numel(), G=final.groups, BLOCK=1024, num_warps=4,
            )
    return dx, dw, dbias


@triton_op("capstriton::self_attention_routing_fwd", mutates_args=())
def self_attention_routing_fwd(
    u_hat: torch.Tensor, bias: torch.Tensor | None, tuning: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(u_hat, None, bias, "ieee", tuning)


@triton_op("capstriton::self_attention_routing_bwd", mutates_args=())
def self_attention_routing_bwd(
    grad_v: torch.Tensor,
    u_hat: torch.Tensor,
    bias: torch.Tensor | None,
    total: torch.Tensor,
    s: torch.Tensor,
    tuning: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    du_hat, _, dbias = _backward(grad_v, u_hat, None, bias, total, s, "ieee", tuning)
    return du_hat, dbias


def _as_float32(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float()


@triton_op("capstriton::self_attention_layer_fwd", mutates_args=())
def self_attention_layer_fwd(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, precision: str, tuning: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if u.dtype == torch.float16:  # as float32 (float16_as_float32), v rounded once to float16
        u32, w32, precision = float16_as_float32(u, weight, precision)
        v, total, s = _forward(u32, w32, _as_float32(bias), precision, tuning)
        return v.to(u.dtype), total, s
    return _forward(u, weight, bias, precision, tuning)


@triton_op("capstriton::self_attention_layer_bwd", mutates_args=())
def self_attention_layer_bwd(
    grad_v: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    total: torch.Tensor,
    s: torch.Tensor,
    precision: str,
    tuning: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if u.dtype == torch.float16:  # as the forward: du_hat's two float16 parts would leave float16's range
        u32, w32, precision = float16_as_float32(u, weight, precision)
        du, dw, dbias = _backward(grad_v, u32, w32, _as_float32(bias), total, s, precision, tuning)
        return du.to(u.dtype), dw.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else dbias
    return _backward(grad_v, u, weight, bias, total, s, precision, tuning)


def _routing_setup_context(ctx, inputs, output):
    u_hat, bias, tuning = inputs
    _, total, s = output
    ctx.save_for_backward(u_hat, bias, total, s)
    ctx.tuning = tuning


def _routing_backward(ctx, grad_v, _grad_total, _grad_s):
    u_hat, bias, total, s = ctx.saved_tensors
    if grad_v is None:
        return None, None, None
    du_hat, dbias = self_attention_routing_bwd(grad_v, u_hat, bias, total, s, ctx.tuning)
    return du_hat, (dbias if bias is not None else None), None


def _layer_setup_context(ctx, inputs, output):
    u, weight, bias, precision, tuning = inputs
    _, total, s = output
    ctx.save_for_backward(u, weight, bias, total, s)
    ctx.args = precision, tuning


def _layer_backward(ctx, grad_v, _grad_total, _grad_s):
    u, weight, bias, total, s = ctx.saved_tensors
    if grad_v is None:
        return None, None, None, None, None
    du, dw, dbias = self_attention_layer_bwd(grad_v, u, weight, bias, total, s, *ctx.args)
    return du, dw, (dbias if bias is not None else None), None, None


self_attention_routing_fwd.register_autograd(_routing_backward, setup_context=_routing_setup_context)
self_attention_routing_bwd.register_autograd(no_double_backward("self-attention routing"))
self_attention_layer_fwd.register_autograd(_layer_backward, setup_context=_layer_setup_context)
self_attention_layer_bwd.register_autograd(no_double_backward("self-attention layer"))


def self_attention_routing(
    u_hat: torch.Tensor, bias: torch.Tensor | None = None, tuning: FusedTuning | None = None
) -> torch.Tensor:
    """``u_hat`` [B, N_in, N_out, D] (and ``bias`` [N_in, N_out]) -> ``v`` [B, N_out, D] with the
    Triton kernels (validated by capstriton.functional)."""
    return self_attention_routing_fwd(u_hat, bias, (tuning or FusedTuning()).as_list())[0]


def self_attention_capsule_routing(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tuning: FusedTuning | None = None
) -> torch.Tensor:
    """The layer form, the predictions on chip: ``u`` [B, N_in, D_in], ``weight``
    [N_in, N_out, D_out, D_in] -> ``v`` [B, N_out, D_out] (validated by capstriton.functional)."""
    tuning = (tuning or FusedTuning()).as_list()
    return self_attention_layer_fwd(u, weight, bias, matmul_precision(), tuning)[0]
