"""The fully connected capsule layer (``ct.capsule_routing``) on the triton backend.

Fused (the default): the predictions ``u_hat[b,i,j] = weight[i,j] @ u[b,i]`` are computed on chip
inside the routing passes and never stored (``capstriton.kernels.fused_layer``):

    capstriton::fused_layer_fwd(u [B, N_in, D_in], weight [N_in, N_out, D, D_in], iterations,
        grad_through_routing, precision, tuning) -> (v [B, N_out, D], s_saved, vsum_saved)
    capstriton::fused_layer_bwd(grad_v, u, weight, s_saved, vsum_saved, iterations,
        grad_through_routing, precision, tuning) -> (grad_u, grad_weight)

A training step saves ``u``, ``weight`` and ``s_saved``, ``vsum_saved`` ([R, B, N_out, D] each).
The forward with products on tensor cores works in input-capsule space (:func:`chunked_config`:
logits ``u . (W^T V)`` and sums ``(c u) W^T`` as tensor-core products, the coupling coefficients
of an iteration in a temporary [B, N_out, N_in] buffer); with IEEE float32 products it walks
tiles of predictions (:func:`fused_config`), as the backward passes do.

Unfused (``fused=False``, kept for comparison): the predictions as one PyTorch batched matmul,
then the ``dynamic_routing`` kernels (u_hat written once, read once per iteration).

``precision`` is how float32 products are made, read from
``torch.get_float32_matmul_precision()`` in Python (:func:`matmul_precision`) and passed as an op
argument, so torch.compile records it without a graph break: "highest" (PyTorch's default) gives
3xTF32 products on tensor cores ("tf32x3": each operand split into a TF32 part and a TF32 remainder,
three products, float32 accumulation) where a tile uses tl.dot, and IEEE float32 FMAs where it uses
rank-one updates; "high" and "medium" allow plain TF32 ("tf32"). The op also takes "ieee" (IEEE
float32 on every path). Half-precision inputs always multiply on tensor cores with float32
accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch.library import triton_op

from ..kernels.common import (
    dynamic_routing_bwd_sum_kernel,
    dynamic_routing_finalize_kernel,
    fused_layer_bwd_dw_sum_kernel,
)
from ..kernels.fused_layer import (
    fused_layer_bwd_ds_kernel,
    fused_layer_bwd_final_kernel,
    fused_layer_bwd_input_kernel,
    fused_layer_bwd_reduce_kernel,
    fused_layer_bwd_weight_kernel,
    fused_layer_coupled_sums_kernel,
    fused_layer_fwd_kernel,
    fused_layer_logits_kernel,
    fused_layer_state_kernel,
    fused_layer_sums_kernel,
    fused_layer_uniform_sums_kernel,
    fused_layer_weight_chunks_kernel,
)
from ..reference.capsule_routing import capsule_predictions
from ._launch import INTERPRETED, empty, launch
from ._passes import (
    FusedConfig,
    FusedTuning,
    PassConfig,
    batch_groups,
    caps_warps,
    float16_as_float32,
    fused_config,
    fused_constexprs,
    input_split,
    matmul_precision,
    uses_tensor_cores,
    whole_register_file,
)
from ._transforms import no_double_backward
from .dynamic_routing import dynamic_routing

__all__ = [
    "FUSED_MAX_OUTPUTS",
    "FusedTuning",  # the op's tuning argument (defined with the passes it tunes: _passes.py)
    "capsule_routing",
    "capsule_routing_unfused",
    "fused_layer_fwd",
    "fused_layer_bwd",
]

_F32 = torch.float32
#: The largest padded [N_out, D_out] block (next powers of two) the rank-one kernels take (IEEE
#: float32 products, the op's "ieee" precision, which no public call selects): 128 classes of 16D,
#: or 32 capsules of 64D. A larger block does not fit a program's registers with the routing state
#: (the kernel report saw spills at 128 x 64 with 16 and 32 warps); the op refuses it. The passes
#: on tensor cores (every public call: half inputs, float32 as TF32 or 3xTF32) hold one output
#: capsule at a time and take any size (the kernel report compiles 128 x 64 capsules of 16D
#: inputs without spills).
FUSED_MAX_OUTPUTS = 2048
#: Flattened outputs (j, d) a program of the forward's iteration 0 multiplies at most (its u operand
#: shared by all of them; chosen from the kernel report, bench/results/kernel_report/NOTES.md).
UNIFORM_OUTPUTS = 64
#: Output capsules up to which the logits pass keeps every capsule's logits in registers
#: (:func:`logits_in_registers`).
LOGITS_IN_REGISTERS = 10


def logits_in_registers(n_out: int, d: int, dtype: torch.dtype) -> bool:
    """Whether the logits pass keeps every output capsule's logits in registers where it forms
    coefficients only (the forward, and the detached backward's recomputation; not the logit
    gradients of the backward through routing): ``fused_layer_logits_kernel``'s ``N_OUT``, 4
    registers a capsule with chunks of 8 input capsules at 64 examples on 4 warps, instead of the
    round trips through memory: bfloat16 inputs, output capsules of 16D (the
    paper's, and CIFAR-10's) and up to :data:`LOGITS_IN_REGISTERS` of them, where the kernel report
    compiles it without spills on sm_90 and sm_80. Elsewhere it spilled: 12 output capsules (424
    bytes), capsules below 16D (a mask a capsule on V and W: 596 bytes for 8D) or of 64D (148
    bytes and more), and beside the float32 parts of 3xTF32 products (64 bytes on sm_80 at the
    paper's layer); bench/results/kernel_report/NOTES.md."""
    return dtype == torch.bfloat16 and d == 16 and n_out <= LOGITS_IN_REGISTERS


def coupled_sums(n_out: int, d: int, d_in: int, dtype: torch.dtype, block_ic: int) -> bool:
    """Whether the forward runs each iteration after the first in one pass with the coupling
    coefficients consumed on chip (``fused_layer_coupled_sums_kernel``) instead of the logits pass,
    which writes them in float32, and the sums pass, which reads them back: where the logits fit
    in registers (:func:`logits_in_registers`) and the partial sums of every output capsule beside
    them, input capsules of at most 8 components (16 spilled 112 bytes on sm_80; the kernel
    report, bench/results/kernel_report/NOTES.md), in chunks of ``block_ic`` >= 8 capsules (the
    logits' component-major order, which the pass takes for its sums too; :func:`chunked_config`
    gives 8 or 16 unless ``FusedTuning.fwd_chunk`` is set below 64)."""
    return logits_in_registers(n_out, d, dtype) and d_in <= 8 and block_ic >= 8


def uniform_block(outputs: int) -> int:
    """Flattened outputs a program of iteration 0 multiplies: of one block holding all ``outputs``
    (N_out * D_out; at least 16, tl.dot's N, at most :data:`UNIFORM_OUTPUTS`) and blocks of 32,
    the one that pads least, the former on a tie (fewer programs, each forming its u operand
    once). The pass is bound by the tensor cores' rate in float32 (3xTF32), where the padded
    columns cost as much as real ones: the paper's 160 outputs take 5 blocks of 32, not 3 of 64."""
    blocks = (min(UNIFORM_OUTPUTS, max(16, triton.next_power_of_2(outputs))), 32)
    return min(blocks, key=lambda b: triton.cdiv(outputs, b) * b)


@dataclass(frozen=True)
class ChunkedConfig:
    """Launch parameters of the passes on tensor cores: a program owns ``block_b`` examples and a
    run of input capsules walked in chunks of ``block_ic`` capsules x ``block_kin`` components.
    ``split`` is the logits pass's runs; the sums passes take runs of their own
    (:func:`sums_split`) of the same chunks, and the final backward pass its own example tile,
    chunks and runs (:func:`final_tiling`, ``FusedTuning.final_chunk``)."""

    block_b: int  # examples a program (the products' M)
    block_ic: int  # input capsules a chunk
    block_kin: int  # next power of two >= D_in
    block_dk: int  # next power of two >= D_out, at least 16 (the logits product's K)
    num_warps: int
    tiles: int  # example tiles: ceil(B / block_b)
    split: PassConfig  # the input capsules cut into runs of whole chunks (block_i = block_ic)


def chunked_config(
    n_in: int, dim: int, d_in: int, batch: int, tuning: FusedTuning | None = None, float32: bool = True
) -> ChunkedConfig:
    """Launch parameters of the passes on tensor cores. Their registers do not grow with the number
    of output capsules (one at a time): per program a [block_b, chunk] tile of u and of the
    products, [block_b, D_out] blocks of V (or ds) and of the sums (chosen from the kernel report
    and the issue model: 64 examples, chunks of 64 elements, 4 warps, no spills on sm_90 or sm_80)."""
    tuning = tuning or FusedTuning()
    block_kin = triton.next_power_of_2(d_in)
    block_dk = max(16, triton.next_power_of_2(dim))
    block_ic = chunk_capsules(tuning.fwd_chunk, dim, d_in)
    # 16 capsules a chunk hold at most 32 elements: beside a chunk of 64 the logits pass's [examples
    # x capsule] softmax state of 16 capsules spilled (D_in 3 and 4: 224 bytes on sm_80 in float32,
    # and the bfloat16 sums pass 8 on sm_90; kernel report)
    if block_ic * block_kin > 32:
        block_ic = min(block_ic, 8)
    # [examples x D_out] blocks of V and ds (and the sums): at most 1024 elements with float32
    # inputs, whose 3xTF32 operands take three times the registers (64 examples of 64D capsules
    # spilled), 4096 with half inputs
    block_b = min(triton.next_power_of_2(tuning.fwd_examples), (1024 if float32 else 4096) // block_dk)
    block_b = max(16, block_b)
    tiles = triton.cdiv(max(batch, 1), block_b)
    return ChunkedConfig(
        block_b=block_b,
        block_ic=block_ic,
        block_kin=block_kin,
        block_dk=block_dk,
        num_warps=tuning.fwd_warps,
        tiles=tiles,
        split=input_split(n_in, block_ic, tiles, tuning.target_programs),
    )


def chunk_capsules(chunk: int, dim: int, d_in: int) -> int:
    """Input capsules a chunk of the passes in input-capsule space, for chunks of about ``chunk``
    (input capsule, D_in) elements: their [D_out x chunk] W block at most 2048 elements (beyond, 64
    x 16 x 16 capsules spilled on sm_80 with triton 3.6: the kernel report), at most 16 capsules
    (the logits pass's per-(example, capsule) softmax state grows with them; the final pass, whose
    chunks are its own, keeps the same rule), at least one."""
    block_dk = max(16, triton.next_power_of_2(dim))
    chunk = min(triton.next_power_of_2(chunk), max(16, 2048 // block_dk))
    return max(1, min(16, chunk // triton.next_power_of_2(d_in)))


def sums_split(cfg: ChunkedConfig, n_in: int, n_out: int, tuning: FusedTuning) -> PassConfig:
    """The sums passes' runs of input capsules (``cfg``'s chunks): about ``tuning.target_programs``
    programs counting their output-capsule axis, as the logits pass without one, so fewer partial
    sums for the per-example reductions (the state, finalize and the backward's running dV sum) to
    write and read."""
    return input_split(n_in, cfg.block_ic, cfg.tiles * n_out, tuning.target_programs)


def final_tiling(batch: int, tuning: FusedTuning) -> tuple[int, int, int, int]:
    """The final backward pass on tensor cores: examples a program (a power of two, at least 16:
    the products' K), example tiles, batch groups (``batch_groups``) and tiles a group."""
    examples = max(16, triton.next_power_of_2(tuning.final_examples))
    tiles = triton.cdiv(max(batch, 1), examples)
    return examples, tiles, *batch_groups(tiles, tuning.groups)


def flat_capsules(x: torch.Tensor) -> torch.Tensor:
    """``x`` (u [B, N_in, D_in] or the weight [N_in, N_out, D, D_in]) with D_in zero padded to a power
    of two and every capsule's components contiguous, as the passes in input-capsule space load
    them (vector loads); ``x`` itself when it is so already (the common case: a contiguous layer
    with D_in = 8), else a copy (of the size of u or of the weight, never of u_hat's)."""
    d_in = x.shape[-1]
    pad = triton.next_power_of_2(d_in) - d_in
    if pad == 0 and x.stride(-1) == 1 and x.stride(-2) == d_in:
        return x
    return torch.nn.functional.pad(x, (0, pad)).contiguous()


def chunked_constexprs(cfg: ChunkedConfig, u: torch.Tensor, precision: str) -> dict:
    """The constexprs and launch options of the passes in input-capsule space."""
    return {
        "BLOCK_B": cfg.block_b,
        "BLOCK_IC": cfg.block_ic,
        "BLOCK_KIN": cfg.block_kin,
        "BLOCK_DK": cfg.block_dk,
        "HALF": u.dtype != torch.float32,
        "PRECISION": precision if u.dtype == torch.float32 else "ieee",
        # the interpreter: float32 products (kernels/common.py: dot_f32)
        "DOT_F32": INTERPRETED,
        "num_warps": cfg.num_warps,
        "num_stages": 1,
    }


def _rank_one_constexprs(cfg: FusedConfig) -> dict:
    """The constexprs and launch options of the layer's passes over tiles of predictions (IEEE
    float32 products by rank-one updates: ``cfg`` made with ``tensor_cores=False``)."""
    consts = fused_constexprs(cfg, torch.float32, "ieee")
    return {k: consts[k] for k in ("BLOCK_B", "BLOCK_J", "BLOCK_D", "num_warps", "num_stages", "maxnreg")}


def _strides(u: torch.Tensor, weight: torch.Tensor) -> dict[str, int]:
    names = ("stride_ub", "stride_ui", "stride_uk", "stride_wi", "stride_wj", "stride_wd", "stride_wk")
    return dict(zip(names, (*u.stride(), *weight.stride()), strict=True))


def _check_precision(u: torch.Tensor, weight: torch.Tensor, precision: str) -> None:
    """The product precision, and the rank-one kernels' limit on the capsule block
    (:data:`FUSED_MAX_OUTPUTS`) where they run."""
    if precision not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"precision must be 'ieee', 'tf32' or 'tf32x3', got {precision!r}")
    if uses_tensor_cores(u, precision):
        return
    _, n_out, d, _ = weight.shape
    if triton.next_power_of_2(int(n_out)) * triton.next_power_of_2(int(d)) > FUSED_MAX_OUTPUTS:
        raise ValueError(
            f"weight: precision 'ieee' (IEEE float32 products) takes capsule blocks of at most "
            f"{FUSED_MAX_OUTPUTS} outputs (next powers of two of N_out x D_out), got {n_out} x {d}; "
            "use 'tf32x3' (float32 accuracy on tensor cores, any size)"
        )


@triton_op("capstriton::fused_layer_fwd", mutates_args=())
def fused_layer_fwd(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int,
    grad_through_routing: bool,
    precision: str,
    tuning: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_precision(u, weight, precision)
    batch, n_in, d_in = u.shape
    _, n_out, d, _ = weight.shape
    v = empty((batch, n_out, d), u.dtype, u.device)
    saved = (iterations, batch, n_out, d)
    s_saved, vsum_saved = empty(saved, _F32, u.device), empty(saved, _F32, u.device)
    if batch == 0:
        return v, s_saved, vsum_saved
    tuned = FusedTuning.from_list(tuning)
    if uses_tensor_cores(u, precision):
        u, weight, precision = float16_as_float32(u, weight, precision)
        _forward_on_tensor_cores(u, weight, iterations, precision, tuned, v, s_saved, vsum_saved)
        return v, s_saved, vsum_saved
    cfg = fused_config(int(n_in), int(n_out), int(d), int(d_in), batch, tuned, tensor_cores=False)
    split = cfg.fwd.split
    partials = [empty((batch, split, n_out, d), _F32, u.device) for _ in range(2)]
    consts = _rank_one_constexprs(cfg)
    strides = _strides(u, weight)
    for r in range(iterations):
        launch(
            fused_layer_fwd_kernel, (cfg.tiles, split),
            u_ptr=u, w_ptr=weight, part_in_ptr=partials[(r + 1) % 2], part_out_ptr=partials[r % 2],
            s_buf_ptr=s_saved, vsum_buf_ptr=vsum_saved,
            B=batch, N_in=n_in, N_out=n_out, D=d, D_in=d_in, SPLIT=split, caps_per_split=cfg.fwd.caps_per_split,
            r=r, **strides, **consts, FIRST=r == 0,
        )
    launch(
        dynamic_routing_finalize_kernel, (batch,),
        part_ptr=partials[(iterations - 1) % 2], s_buf_ptr=s_saved, v_ptr=v,
        B=batch, N_out=n_out, D=d, SPLIT=split, last=iterations - 1,
        BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps_caps,
    )
    return v, s_saved, vsum_saved


class _CouplingPasses:
    """The passes in input-capsule space for one call (``capstriton.kernels.fused_layer``): the
    coupling coefficients of a step (and in the backward the logit gradients) into one of
    ``slots`` buffer slots, then per output capsule the partial sums of ``c u_hat`` (or ``g
    u_hat``) over runs of their own (iteration 0: of ``u_hat / N_out`` over blocks of every output
    capsule's outputs); and the final backward pass, which reads every slot."""

    def __init__(
        self, u: torch.Tensor, weight: torch.Tensor, precision: str, tuning: FusedTuning, grad: bool, slots: int = 1,
        may_couple: bool = False,
    ):
        batch, n_in, d_in = u.shape
        _, n_out, d, _ = weight.shape
        self.cfg = cfg = chunked_config(int(n_in), int(d), int(d_in), batch, tuning, u.dtype == torch.float32)
        # the forward's later iterations in one pass each, where they may and the shape allows
        self.coupled = coupled = may_couple and coupled_sums(int(n_out), int(d), int(d_in), u.dtype, cfg.block_ic)
        self.u, self.weight = u, weight = flat_capsules(u), flat_capsules(weight)
        self.split = cfg.split.split
        # (the coupled sums keep the coefficients on chip: no buffer, and no pass that takes one)
        self.coefficients = None if coupled else empty((slots, batch, n_out, n_in), _F32, u.device)
        # the logit gradients (the backward through routing; otherwise the kernels never touch
        # this argument, which repeats the coefficients)
        self.logit_grads = empty((slots, batch, n_out, n_in), _F32, u.device) if grad else self.coefficients
        self.sums_split = sums_split(cfg, int(n_in), int(n_out), tuning)
        split = self.sums_split.split
        if coupled:
            # the coupled sums' runs of the chunks (fewer programs than the logits pass: the partial
            # sums of all output capsules a program); they take u's batch stride in capsules (aligned
            # vector loads: a copy of u where it is not whole capsules, once a call) and the weight
            # in chunks (fused_layer_weight_chunks_kernel: a copy of the weight's size, once a call)
            self.coupled_split = input_split(int(n_in), cfg.block_ic, cfg.tiles, tuning.coupled_programs)
            kin, ic = cfg.block_kin, cfg.block_ic
            self.coupled_u = self.u if self.u.stride(0) % kin == 0 else self.u.contiguous()
            self.coupled_w = empty((triton.cdiv(int(n_in), ic), n_out, cfg.block_dk, kin, ic), u.dtype, u.device)
            launch(
                fused_layer_weight_chunks_kernel, (triton.cdiv(int(n_in), ic), n_out),
                w_ptr=weight, out_ptr=self.coupled_w, N_in=n_in, N_out=n_out, D=d,
                stride_wi=weight.stride(0), stride_wj=weight.stride(1), BLOCK_IC=ic, BLOCK_KIN=kin,
                BLOCK_DK=cfg.block_dk,
            )
            split = max(split, self.coupled_split.split)
        # [B, SPLIT, N_out, D] partial sums, of the split of the pass that wrote them
        self.partials = empty((batch, split, n_out, d), _F32, u.device)
        self.grad = grad
        self.n_out = n_out
        self.consts = chunked_constexprs(cfg, u, precision)
        # the logits pass's float32 factors V_r and ds_r, split once per step into the two parts
        # their products take (kernels: factor_parts) by the kernel that forms them, instead of at
        # every chunk and output capsule: half inputs, and float32 at 3xTF32 (TF32 takes V as is)
        parts_dtype = u.dtype if u.dtype != torch.float32 else (_F32 if precision == "tf32x3" else None)
        self.parts = parts_dtype is not None
        if self.parts:
            self.vparts = empty((2, batch, n_out, d), parts_dtype, u.device)
            self.dsparts = empty((2, batch, n_out, d), parts_dtype, u.device) if grad else self.vparts
        self.sizes = dict(B=batch, N_in=n_in, N_out=n_out, D=d)
        self.target_programs = tuning.target_programs_bwd
        self.final_tiling = final_tiling(batch, tuning)
        # the final pass's chunks (its own size) and the input gradient's runs of them: about
        # target_programs_bwd programs with its own example tiles
        self.final_ic = chunk_capsules(tuning.final_chunk, int(d), int(d_in))
        self.final_split = input_split(int(n_in), self.final_ic, self.final_tiling[1], tuning.target_programs_bwd)

    def _buffers(self) -> dict:
        return dict(c_ptr=self.coefficients, g_ptr=self.logit_grads)

    def _args(self, slot: int, split: PassConfig) -> dict:
        return dict(
            u_ptr=self.u, w_ptr=self.weight, **self._buffers(), slot=slot, **self.sizes,
            caps_per_split=split.caps_per_split, stride_ub=self.u.stride(0),
            stride_wi=self.weight.stride(0), stride_wj=self.weight.stride(1), **self.consts,
        )

    def coupling(self, r: int, vsum_saved: torch.Tensor, ds_saved: torch.Tensor, slot: int = 0) -> None:
        """The coupling coefficients of step r (and the logit gradients) into ``slot``; V_r and ds_r
        from the saved buffers, or where the passes take parts from ``vparts`` and ``dsparts``,
        which the kernel that formed them has just written (``fused_layer_state_kernel``,
        ``fused_layer_bwd_ds_kernel``)."""
        if self.parts:
            factors = dict(v_ptr=self.vparts, ds_ptr=self.dsparts, r=0)
        else:
            factors = dict(v_ptr=vsum_saved, ds_ptr=ds_saved, r=r)
        in_registers = logits_in_registers(self.n_out, self.sizes["D"], self.u.dtype) and not self.grad
        launch(
            fused_layer_logits_kernel, (self.cfg.tiles, self.split),
            **factors, **self._args(slot, self.cfg.split), GRAD=self.grad, PARTS=self.parts,
            N_OUT=self.n_out if in_registers else 0,
            # left to ptxas, three shapes spilled 4 to 8 bytes on sm_90 or sm_80 (the kernel
            # report); held to three programs' share of the registers, others did on sm_80
            maxnreg=whole_register_file(self.consts["num_warps"]),
        )

    def sums(self, slot: int = 0) -> None:
        # the pass knows bfloat16 inputs by their dtype (half_products), float32 ones need no split
        args = {k: v for k, v in self._args(slot, self.sums_split).items() if k != "HALF"}
        launch(
            fused_layer_sums_kernel, (self.cfg.tiles, self.sums_split.split, self.n_out),
            part_ptr=self.partials, SPLIT=self.sums_split.split, **args, GRAD=self.grad,
        )

    def coupled_sums(self) -> None:
        """The forward's coupling coefficients and sums of a step in one pass (:func:`coupled_sums`),
        from V_r's two parts (``vparts``, which the state kernel has just written), over runs of
        their own (``coupled_split``), on ``coupled_u`` (u with a batch stride of whole capsules: a
        copy where it is not) and ``coupled_w`` (the weight in chunks, laid out once a call)."""
        consts = {k: v for k, v in self.consts.items() if k not in ("HALF", "PRECISION")}
        u, kin = self.coupled_u, self.cfg.block_kin
        launch(
            fused_layer_coupled_sums_kernel, (self.cfg.tiles, self.coupled_split.split),
            u_ptr=u, w_ptr=self.coupled_w, w_sums_ptr=self.coupled_w, vparts_ptr=self.vparts, part_ptr=self.partials,
            B=self.sizes["B"], N_in=self.sizes["N_in"], SPLIT=self.coupled_split.split,
            caps_per_split=self.coupled_split.caps_per_split, stride_uc=u.stride(0) // kin, **consts,
            N_OUT=self.n_out,
            maxnreg=whole_register_file(consts["num_warps"]),
        )

    def uniform_sums(self, vsum_saved: torch.Tensor) -> None:
        """Iteration 0: the partials of s_0 (uniform coupling) over blocks of flattened outputs
        (:func:`uniform_block`); V_0 = 0 saved."""
        outputs = self.n_out * self.sizes["D"]
        block = uniform_block(outputs)
        consts = {k: v for k, v in self.consts.items() if k not in ("BLOCK_DK", "HALF")}
        launch(
            fused_layer_uniform_sums_kernel, (self.cfg.tiles, self.sums_split.split, triton.cdiv(outputs, block)),
            u_ptr=self.u, w_ptr=self.weight, part_ptr=self.partials, vsum_buf_ptr=vsum_saved,
            **self.sizes, SPLIT=self.sums_split.split, caps_per_split=self.sums_split.caps_per_split,
            stride_ub=self.u.stride(0), stride_wi=self.weight.stride(0), stride_wj=self.weight.stride(1),
            **consts, BLOCK_NF=block,
        )

    def final(
        self, du: torch.Tensor, vsum_saved: torch.Tensor, ds_saved: torch.Tensor, iterations: int, r_first: int,
        uniform: bool,
    ) -> torch.Tensor:
        """The final backward pass: ``du`` written, the batch groups' parts of the weight gradient
        returned (float32, ``final_tiling``), in chunks of ``final_ic`` input capsules."""
        bb, tiles, groups, tiles_per_group = self.final_tiling
        d_in = du.shape[2]
        steps = dict(
            vsum_buf_ptr=vsum_saved, ds_buf_ptr=ds_saved, **self._buffers(), **self.sizes, D_in=d_in,
            R=iterations, r_first=r_first, **self.consts, UNIFORM=uniform, GRAD_THROUGH=self.grad,
        )
        steps["BLOCK_B"], steps["BLOCK_IC"] = bb, self.final_ic
        # left to ptxas, some shapes were held to 128 registers and spilled a few bytes (kernel report)
        steps["maxnreg"] = whole_register_file(steps["num_warps"])
        # du^T with the chunk as the products' M where it has 64 rows (sm_90's warpgroup MMA);
        # D_out > 32 keeps chunks of at most 32 (chunk_capsules), where du^T spilled (kernel report)
        chunk_m = self.final_ic * self.cfg.block_kin >= 64
        launch(
            fused_layer_bwd_input_kernel, (tiles, self.final_split.split),
            u_ptr=self.u, w_ptr=self.weight, du_ptr=du, caps_per_split=self.final_split.caps_per_split,
            stride_ub=self.u.stride(0), stride_wi=self.weight.stride(0), stride_wj=self.weight.stride(1), **steps,
            CHUNK_M=chunk_m,
        )
        n_in, n_out, d = self.sizes["N_in"], self.n_out, self.sizes["D"]
        weight_split = input_split(n_in, self.final_ic, groups * n_out, self.target_programs)
        dw_part = empty((groups, n_in, n_out, d, d_in), _F32, du.device)
        launch(
            fused_layer_bwd_weight_kernel, (weight_split.split, n_out, groups),
            u_ptr=self.u, dw_part_ptr=dw_part, caps_per_split=weight_split.caps_per_split,
            tiles_per_group=tiles_per_group, stride_ub=self.u.stride(0), **steps,
        )
        return dw_part


def _forward_on_tensor_cores(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int,
    precision: str,
    tuning: FusedTuning,
    v: torch.Tensor,
    s_saved: torch.Tensor,
    vsum_saved: torch.Tensor,
) -> None:
    """The forward in input-capsule space: iteration 0 the sums with uniform coupling, then per
    iteration the saved state from the previous partials, the coupling coefficients, the sums; the
    same outputs and saved state as the rank-one forward."""
    batch, _, _ = u.shape
    _, n_out, d, _ = weight.shape
    # (one iteration has no later ones: nothing to lay the weight out in chunks for)
    passes = _CouplingPasses(u, weight, precision, tuning, grad=False, may_couple=iterations > 1)
    block_j, block_d = triton.next_power_of_2(n_out), triton.next_power_of_2(d)
    per_example = dict(
        part_ptr=passes.partials, s_buf_ptr=s_saved, B=batch, N_out=n_out, D=d,
        BLOCK_J=block_j, BLOCK_D=block_d, num_warps=caps_warps(block_j, block_d),
    )
    passes.uniform_sums(vsum_saved)
    split = passes.sums_split.split  # of the partials the last pass wrote
    for r in range(1, iterations):
        launch(
            fused_layer_state_kernel, (batch,), vsum_buf_ptr=vsum_saved, r=r, **per_example, SPLIT=split,
            vparts_ptr=passes.vparts if passes.parts else vsum_saved, PARTS=passes.parts,
        )
        if passes.coupled:
            passes.coupled_sums()
            split = passes.coupled_split.split
        else:
            passes.coupling(r, vsum_saved, vsum_saved)  # (no ds in the forward)
            passes.sums()
    launch(dynamic_routing_finalize_kernel, (batch,), v_ptr=v, last=iterations - 1, **per_example, SPLIT=split)


def _ds_step(
    dv: torch.Tensor, s_saved: torch.Tensor, ds_saved: torch.Tensor, r: int,
    vsum_saved: torch.Tensor | None = None, passes: _CouplingPasses | None = None,
) -> None:
    """``ds_r = J_squash(s_r)^T dv`` per example, into slot r of ``ds_saved``; where ``passes``
    (whose logits pass of step r follows) takes parts, V_r (from ``vsum_saved``) and, through
    routing, ds_r split into them."""
    batch, n_out, d = dv.shape
    block_j, block_d = triton.next_power_of_2(n_out), triton.next_power_of_2(d)
    split = passes is not None and passes.parts
    split_ds = split and passes.grad
    launch(
        fused_layer_bwd_ds_kernel, (batch,),
        dv_ptr=dv, s_buf_ptr=s_saved, ds_buf_ptr=ds_saved, B=batch, N_out=n_out, D=d, r=r,
        # (where nothing is split the kernel never touches the last three buffers)
        vsum_buf_ptr=vsum_saved if split else ds_saved, vparts_ptr=passes.vparts if split else ds_saved,
        dsparts_ptr=passes.dsparts if split_ds else ds_saved, PARTS=split, DS_PARTS=split_ds,
        stride_gb=dv.stride(0), stride_gj=dv.stride(1), stride_gd=dv.stride(2),
        BLOCK_J=block_j, BLOCK_D=block_d, num_warps=caps_warps(block_j, block_d),
    )


def _add_dv(partials: torch.Tensor, dv_sum: torch.Tensor, first: bool) -> None:
    """The running sum of the later steps' dV: ``dv_sum (+)= sum of the split partials`` [B, SPLIT,
    N_out, D] in split order, per example (``first``: assigned)."""
    batch, split, n_out, d = partials.shape
    block_j, block_d = triton.next_power_of_2(n_out), triton.next_power_of_2(d)
    launch(
        dynamic_routing_bwd_sum_kernel, (batch,),
        dpart_ptr=partials, dvsum_ptr=dv_sum, B=batch, N_out=n_out, D=d, SPLIT=split,
        BLOCK_J=block_j, BLOCK_D=block_d, FIRST=first, num_warps=caps_warps(block_j, block_d),
    )


def _reduce_over_predictions(
    grad_v: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    s_saved: torch.Tensor,
    vsum_saved: torch.Tensor,
    ds_saved: torch.Tensor,
    iterations: int,
    precision: str,
    tuning: FusedTuning,
) -> torch.Tensor:
    """The backward through routing, steps R-1 .. 1, over tiles of predictions with IEEE float32
    products (``fused_layer_bwd_reduce_kernel``: ds_r, stored, and the partials of dV_r), each
    step followed by the running sum of the dV. Returns the gradient reaching v_0."""
    batch, n_in, d_in = u.shape
    _, n_out, d, _ = weight.shape
    cfg = fused_config(int(n_in), int(n_out), int(d), int(d_in), batch, tuning, tensor_cores=False)
    split = cfg.bwd.split
    dpartials = empty((batch, split, n_out, d), _F32, u.device)
    dv_sum = empty((batch, n_out, d), _F32, u.device)
    dv = grad_v
    for r in range(iterations - 1, 0, -1):
        launch(
            fused_layer_bwd_reduce_kernel, (cfg.tiles, split),
            u_ptr=u, w_ptr=weight, dv_ptr=dv, s_buf_ptr=s_saved, vsum_buf_ptr=vsum_saved,
            ds_buf_ptr=ds_saved, dpart_ptr=dpartials,
            B=batch, N_in=n_in, N_out=n_out, D=d, D_in=d_in, SPLIT=split,
            caps_per_split=cfg.bwd.caps_per_split, r=r, **_strides(u, weight),
            stride_gb=dv.stride(0), stride_gj=dv.stride(1), stride_gd=dv.stride(2), **_rank_one_constexprs(cfg),
        )
        _add_dv(dpartials, dv_sum, first=r == iterations - 1)
        dv = dv_sum
    return dv_sum


def _backward_on_tensor_cores(
    grad_v: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    s_saved: torch.Tensor,
    vsum_saved: torch.Tensor,
    ds_saved: torch.Tensor,
    du: torch.Tensor,
    iterations: int,
    grad_through_routing: bool,
    precision: str,
    tuning: FusedTuning,
) -> torch.Tensor:
    """The backward in input-capsule space. Through routing: per step R-1 .. 1, ``ds_r``, the
    coefficients and logit gradients (kept, one slot a step), the partials of ``dV_r = sum_i g
    u_hat`` and their running sum; then ``ds_0`` and the final pass. Detached: ``ds_{R-1}``, the
    coefficients of step R-1, the final pass. Writes ``du``; returns the batch groups' parts of the
    weight gradient."""
    batch, _, _ = u.shape
    _, n_out, d, _ = weight.shape
    through = grad_through_routing and iterations > 1  # steps with a logit gradient
    r_lo = 0 if grad_through_routing else iterations - 1  # the lowest step with a gradient
    r_first = 1 if r_lo == 0 else r_lo  # the steps with stored coefficients: r_first .. R-1
    passes = _CouplingPasses(u, weight, precision, tuning, grad=through, slots=max(1, iterations - r_first))
    dv = grad_v
    if through:
        dv_sum = empty((batch, n_out, d), _F32, u.device)
        for r in range(iterations - 1, 0, -1):
            _ds_step(dv, s_saved, ds_saved, r, vsum_saved, passes)
            passes.coupling(r, vsum_saved, ds_saved, slot=r - r_first)
            passes.sums(slot=r - r_first)
            _add_dv(passes.partials, dv_sum, first=r == iterations - 1)
            dv = dv_sum
    # detached: the coupling of the last step follows (no logit gradient)
    _ds_step(dv, s_saved, ds_saved, r_lo, vsum_saved, passes if r_lo > 0 else None)
    if r_lo > 0:
        passes.coupling(r_lo, vsum_saved, ds_saved)
    return passes.final(du, vsum_saved, ds_saved, iterations, r_first, r_lo == 0)


@triton_op("capstriton::fused_layer_bwd", mutates_args=())
def fused_layer_bwd(
    grad_v: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    s_saved: torch.Tensor,
    vsum_saved: torch.Tensor,
    iterations: int,
    grad_through_routing: bool,
    precision: str,
    tuning: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_precision(u, weight, precision)
    batch, n_in, d_in = u.shape
    _, n_out, d, _ = weight.shape
    du = empty(u.shape, u.dtype, u.device)
    dw = empty(weight.shape, weight.dtype, weight.device)
    if batch == 0:
        return du, dw.zero_()  # no example: no gradient
    tuned = FusedTuning.from_list(tuning)
    ds_saved = empty(s_saved.shape, _F32, u.device)
    if uses_tensor_cores(u, precision):
        u, weight, precision = float16_as_float32(u, weight, precision)
        dw_part = _backward_on_tensor_cores(
            grad_v, u, weight, s_saved, vsum_saved, ds_saved, du, iterations, grad_through_routing, precision, tuned
        )
        _sum_groups(dw_part, dw)
        return du, dw
    # dv_r, the gradient reaching v_r: the output gradient for the last step, the running sum of
    # the later steps' dV for the others (chosen here, so no kernel selects at run time)
    dv = grad_v
    if grad_through_routing and iterations > 1:
        dv = _reduce_over_predictions(grad_v, u, weight, s_saved, vsum_saved, ds_saved, iterations, precision, tuned)
    _ds_step(dv, s_saved, ds_saved, 0 if grad_through_routing else iterations - 1)
    # IEEE float32 products: rank-one updates over tiles of predictions. The groups' parts of dW
    # are accumulated in place (from zero).
    cfg = fused_config(int(n_in), int(n_out), int(d), int(d_in), batch, tuned, tensor_cores=False)
    consts = {**_rank_one_constexprs(cfg), "BLOCK_K": cfg.block_k}
    dw_part = torch.zeros((cfg.groups, *weight.shape), dtype=_F32, device=u.device)
    launch(
        fused_layer_bwd_final_kernel, (cfg.final.split, cfg.groups),
        u_ptr=u, w_ptr=weight, vsum_buf_ptr=vsum_saved, ds_buf_ptr=ds_saved, du_ptr=du, dw_part_ptr=dw_part,
        B=batch, N_in=n_in, N_out=n_out, D=d, D_in=d_in, R=iterations,
        caps_per_split=cfg.final.caps_per_split, tiles_per_group=cfg.tiles_per_group, **_strides(u, weight),
        **consts, GRAD_THROUGH=grad_through_routing,
    )
    _sum_groups(dw_part, dw)
    return du, dw


def _sum_groups(dw_part: torch.Tensor, dw: torch.Tensor) -> None:
    """``dw = sum_g dw_part[g]`` in group order, in the weight's dtype."""
    numel = dw.numel()
    block = 1024
    launch(
        fused_layer_bwd_dw_sum_kernel, (triton.cdiv(numel, block),),
        dw_part_ptr=dw_part, dw_ptr=dw, numel=numel, G=dw_part.shape[0], BLOCK=block, num_warps=4,
    )


def _setup_context(ctx, inputs, output):
    u, weight, iterations, grad_through_routing, precision, tuning = inputs
    _, s_saved, vsum_saved = output
    ctx.save_for_backward(u, weight, s_saved, vsum_saved)
    ctx.args = iterations, grad_through_routing, precision, tuning


def _backward(ctx, grad_v, _grad_s_saved, _grad_vsum_saved):
    u, weight, s_saved, vsum_saved = ctx.saved_tensors
    if grad_v is None:
        return None, None, None, None, None, None
    du, dw = fused_layer_bwd(grad_v, u, weight, s_saved, vsum_saved, *ctx.args)
    return du, dw, None, None, None, None


fused_layer_fwd.register_autograd(_backward, setup_context=_setup_context)
fused_layer_bwd.register_autograd(no_double_backward("fused capsule layer"))


def capsule_routing(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int,
    grad_through_routing: bool,
    tuning: FusedTuning | None = None,
) -> torch.Tensor:
    """The fused layer: ``u`` [B, N_in, D_in], ``weight`` [N_in, N_out, D_out, D_in] -> ``v``
    [B, N_out, D_out] (validated by capstriton.functional); ``tuning`` overrides the launch
    parameters. Any capsule sizes: the products run on tensor cores (float32 at PyTorch's
    matmul precision, 3xTF32 or TF32), whose passes hold one output capsule at a time."""
    tuning = (tuning or FusedTuning()).as_list()
    return fused_layer_fwd(u, weight, iterations, grad_through_routing, matmul_precision(), tuning)[0]


def capsule_routing_unfused(
    u: torch.Tensor, weight: torch.Tensor, iterations: int, grad_through_routing: bool
) -> torch.Tensor:
    """The predictions as one PyTorch batched matmul (u_hat in memory), then the routing kernels.
    u_hat has the input dtype, as eager's matmul gives it, except for float16: predictions of
    float16 numbers leave float16's range where the layer's output does not (u and W of 1e3 give
    u_hat of about 4e6: infinite, v NaN; found by break-testing), so float16 inputs run as float32
    (u_hat twice the bytes) and v is rounded once to float16, as the fused layer and the torch
    backend compute it. bfloat16 has float32's range."""
    dtype = u.dtype
    if dtype == torch.float16:
        u, weight = u.float(), weight.float()
    return dynamic_routing(capsule_predictions(u, weight), iterations, grad_through_routing).to(dtype)
