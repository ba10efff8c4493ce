"""What the passes of more than one algorithm share: a pass's split of the input capsules
(:class:`PassConfig`, dynamic routing's and the layers'), the knobs and launch parameters of the
passes over tiles of predictions made on chip (:class:`FusedTuning`, :func:`fused_config`: the
fused capsule layer and self-attention routing), and the float32 product precision both layers
take from PyTorch's matmul setting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton

from ._launch import INTERPRETED

__all__ = [
    "PassConfig",
    "check_tuning",
    "knob_expectation",
    "rows_per_tile",
    "input_split",
    "FusedTuning",
    "FusedConfig",
    "batch_groups",
    "caps_warps",
    "fused_config",
    "whole_register_file",
    "fused_constexprs",
    "matmul_precision",
    "uses_tensor_cores",
    "float16_as_float32",
]


@dataclass(frozen=True)
class PassConfig:
    """One pass over u_hat: ``block_i`` input capsules per tile, ``split`` programs per example
    along the input capsules, each owning ``caps_per_split`` of them (whole tiles; the last split
    may be shorter). ``split`` and ``caps_per_split`` are runtime kernel arguments: the batch size
    changes the grid, never the compiled kernel."""

    block_i: int
    split: int
    caps_per_split: int


def knob_expectation(value, warps: bool) -> str | None:
    """What a tuning knob must be, where ``value`` is not that (None where it is): an int >= 1, a
    warps knob a power of two up to 32 (as Triton launches them). The one rule of
    :func:`check_tuning` and of the kernel report's ``--config``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return "an int"
    if value < 1 or (warps and (value > 32 or value & (value - 1))):
        return "a power of two from 1 to 32" if warps else ">= 1"
    return None


def check_tuning(tuning, warps: tuple[str, ...]) -> None:
    """A tuning dataclass's knobs as :func:`knob_expectation` says, the ``warps`` fields as warps,
    ``num_warps`` also None (the heuristic's choice); TypeError / ValueError naming the knob."""
    for f in dataclasses.fields(tuning):
        value = getattr(tuning, f.name)
        if value is None and f.name == "num_warps":
            continue
        expected = knob_expectation(value, f.name in warps)
        if expected == "an int":
            raise TypeError(f"{type(tuning).__name__}.{f.name} must be an int, got {type(value).__name__}")
        if expected is not None:
            expected += ", or None" if f.name == "num_warps" else ""
            raise ValueError(f"{type(tuning).__name__}.{f.name} must be {expected}, got {value}")


def rows_per_tile(tile: int, row: int, cap: int = 64) -> int:
    """Rows of ``row`` elements a tile of about ``tile`` elements holds: the largest power of two
    that fits (a block size Triton accepts), at least 1, at most ``cap`` (a power of two)."""
    rows = max(1, tile // row)
    return min(cap, 1 << (rows.bit_length() - 1))


def input_split(n_in: int, block_i: int, batch: int, target_programs: int) -> PassConfig:
    """The input capsules cut into runs of whole ``block_i`` tiles so that ``batch * split``
    approaches ``target_programs`` (one split per example once the batch alone reaches it); the
    last split may be shorter (the kernels mask at ``N_in``)."""
    tiles = triton.cdiv(n_in, block_i)
    splits = max(1, min(tiles, triton.cdiv(target_programs, max(batch, 1))))
    caps_per_split = triton.cdiv(tiles, splits) * block_i
    return PassConfig(block_i, triton.cdiv(n_in, caps_per_split), caps_per_split)


#: "highest" as 3xTF32: its products drop only the product of the two remainders and truncate the
#: remainders to TF32, a relative error of at most about 2^-20 per product against IEEE's 2^-24,
#: which the routing's own float32 rounding hides: routing an emulation of its predictions lands
#: as close to float64 as routing IEEE predictions (tests/ops/test_fused_layer.py; the figures in
#: bench/results/kernel_report/NOTES.md). The split is the kernels' own
#: (``kernels/common.py``: ``dot_f32``). Limits of the trick: operands above the largest TF32
#: (3.40e38) round to infinity (their products NaN), and remainders below float32's normal range
#: (operands under about 2e-35) may be flushed, leaving TF32 accuracy there. Tensor-core products
#: take fewer instructions than IEEE FMAs (the issue model: bench/results/kernel_report/NOTES.md).
_PRECISIONS = {"highest": "tf32x3", "high": "tf32", "medium": "tf32"}


@torch.compiler.assume_constant_result
def matmul_precision() -> str:
    """tl.dot's ``input_precision`` for float32 products under PyTorch's float32 matmul setting.
    Under torch.compile the setting is read when the function is traced and becomes a constant of
    the graph (dynamo cannot trace the getter), as inductor's own matmuls take it at compile time."""
    return _PRECISIONS[torch.get_float32_matmul_precision()]


@dataclass(frozen=True)
class FusedTuning:
    """The knobs of :func:`fused_config` (not yet timed on a GPU: chosen from the kernel report's
    registers and occupancy, ``bench/results/kernel_report/NOTES.md``)."""

    #: float32 elements of a [BLOCK_B, BLOCK_N] block (examples x flattened outputs) in the passes
    tile: int = 4096
    #: programs a forward launch aims for (input capsules split across them)
    target_programs: int = 1024
    #: programs a backward launch aims for
    target_programs_bwd: int = 2048
    #: most batch groups of the final backward pass: the weight gradient is summed over a group's
    #: examples on chip, then the groups' parts in order
    groups: int = 8
    #: warps per program of the passes; None: 8 (the kernel report's choice, see fused_config)
    num_warps: int | None = None
    #: the forward on tensor cores (``fused_layer.chunked_config``): examples a program (at least 16, the
    #: products' M), (input capsule, D_in) elements a chunk, warps a program
    fwd_examples: int = 64
    fwd_chunk: int = 64
    fwd_warps: int = 4
    #: examples a program of the final backward pass on tensor cores (at least 16): its [examples x
    #: chunk] products per step and output capsule spilled at 32 and 64 (kernel report)
    final_examples: int = 16
    #: (input capsule, D_in) elements a chunk of the final backward pass (``fused_layer.chunk_capsules``):
    #: 128 no spill with its 16 examples, where the forward's 64 examples spilled (kernel report)
    final_chunk: int = 128
    #: programs the bfloat16 forward's one pass an iteration (``fused_layer.coupled_sums``) aims
    #: for: each writes an [N_out, D_out] partial sum an example that the next pass reads back, and
    #: two of its programs fill an SM's registers
    coupled_programs: int = 256

    def __post_init__(self):
        check_tuning(self, ("num_warps", "fwd_warps"))

    def as_list(self) -> list[int]:
        """The op argument (0 stands for ``num_warps=None``)."""
        return [
            self.tile, self.target_programs, self.target_programs_bwd, self.groups, self.num_warps or 0,
            self.fwd_examples, self.fwd_chunk, self.fwd_warps, self.final_examples, self.final_chunk,
            self.coupled_programs,
        ]

    @classmethod
    def from_list(cls, values: list[int]) -> FusedTuning:
        tile, programs, programs_bwd, groups, warps, *chunked = values
        return cls(tile, programs, programs_bwd, groups, warps or None, *chunked)


@dataclass(frozen=True)
class FusedConfig:
    """Launch parameters of the fused kernels for one shape and batch size."""

    block_b: int  # examples per tile (a batch-independent constant: no recompiles)
    block_j: int  # next power of two >= N_out
    block_d: int  # next power of two >= D_out
    block_k: int  # D_in padded for the product (>= 16 for tl.dot)
    use_dot: bool  # the products as tl.dot: tiles of at least 16 examples x 16 outputs
    num_warps: int
    num_warps_caps: int  # the per-example kernels (finalize, backward sum, ds)
    tiles: int  # example tiles: ceil(B / block_b)
    fwd: PassConfig  # split of the input capsules per tile, forward (block_i = 1)
    bwd: PassConfig  # the backward's reduce passes
    final: PassConfig  # the final backward pass: input capsules per program along axis 0
    groups: int  # batch groups of the final pass (axis 1)
    tiles_per_group: int


def batch_groups(tiles: int, groups: int) -> tuple[int, int]:
    """At most ``groups`` batch groups of whole example tiles for a final backward pass (the weight
    gradient is summed over a group's examples, then over the groups in order): (groups, tiles a
    group), no group empty."""
    tiles_per_group = triton.cdiv(tiles, max(1, min(groups, tiles)))
    return triton.cdiv(tiles, tiles_per_group), tiles_per_group


def caps_warps(block_j: int, block_d: int) -> int:
    """Warps of the per-example kernels (a [block_j, block_d] block each: finalize, sums, ds)."""
    return min(8, max(4, block_j * block_d // 128))


def fused_config(
    n_in: int,
    n_out: int,
    dim: int,
    d_in: int,
    batch: int,
    tuning: FusedTuning | None = None,
    tensor_cores: bool = True,
) -> FusedConfig:
    """Launch parameters for the fused kernels.

    A program's working set is a few [BLOCK_B, BLOCK_J, BLOCK_D] float32 blocks (predictions,
    the running sum V, the accumulated s or dV, ds): ``BLOCK_B`` is as many examples as fit in
    ``tuning.tile`` elements with the flattened outputs, a power of two up to 64. The products use
    ``tl.dot`` where ``tensor_cores`` multiply them (half-precision inputs, or float32 as TF32 or
    3xTF32) and the tile is at least 16 x 16 (16 examples of the paper's 10 x 16 outputs);
    otherwise D_in rank-one updates on the CUDA cores (IEEE float32 products, the same FMAs an
    IEEE float32 tl.dot would make, in fewer registers; large capsules, whose tiles hold few
    examples, and float32 at the op's "ieee" precision).
    """
    tuning = tuning or FusedTuning()
    block_j = triton.next_power_of_2(n_out)
    block_d = triton.next_power_of_2(dim)
    block_n = block_j * block_d
    block_b = rows_per_tile(tuning.tile, block_n)
    use_dot = tensor_cores and block_b >= 16 and block_n >= 16
    block_k = max(16, triton.next_power_of_2(d_in)) if use_dot else triton.next_power_of_2(d_in)
    # 8 warps with the whole register file (maxnreg) compile every case of the kernel report
    # without spilling, on both paths (bench/results/kernel_report/NOTES.md)
    num_warps = tuning.num_warps or 8
    tiles = triton.cdiv(max(batch, 1), block_b)
    groups, tiles_per_group = batch_groups(tiles, tuning.groups)
    return FusedConfig(
        block_b=block_b,
        block_j=block_j,
        block_d=block_d,
        block_k=block_k,
        use_dot=use_dot,
        num_warps=num_warps,
        num_warps_caps=caps_warps(block_j, block_d),
        tiles=tiles,
        fwd=input_split(n_in, 1, tiles, tuning.target_programs),
        bwd=input_split(n_in, 1, tiles, tuning.target_programs_bwd),
        final=input_split(n_in, 1, groups, tuning.target_programs_bwd),
        groups=groups,
        tiles_per_group=tiles_per_group,
    )


def whole_register_file(num_warps: int) -> int:
    """``maxnreg`` giving a program of ``num_warps`` warps the whole register file (64 K 32-bit
    registers an SM), at most 255 a thread."""
    return min(255, 65536 // (32 * num_warps))


def fused_constexprs(cfg: FusedConfig, dtype: torch.dtype, precision: str) -> dict:
    """The constexprs and launch options every fused-layer-style pass takes."""
    # Triton's interpreter (3.6 to 3.9) multiplies every dot in float32 whatever the precision, and
    # bfloat16 operands as their raw 16-bit integers: the kernels widen them (exactly) and skip the
    # 3xTF32 split when it runs them (kernels/common.py: dot_f32).
    return {
        "BLOCK_B": cfg.block_b,
        "BLOCK_J": cfg.block_j,
        "BLOCK_D": cfg.block_d,
        "BLOCK_K": cfg.block_k,
        "USE_DOT": cfg.use_dot,
        # float32 products only: half types multiply on tensor cores whatever the setting
        "PRECISION": precision if dtype == torch.float32 else "ieee",
        "DOT_F32": INTERPRETED and cfg.use_dot,
        "num_warps": cfg.num_warps,
        # no software pipelining of the capsule loops: its staged copies of the u and W tiles
        # cost registers and shared memory that the routing blocks need (spills otherwise)
        "num_stages": 1,
        # The whole register file for a program (at most 255 a thread): left to itself ptxas 13
        # (triton 3.9) kept some variants at 40 to 128 registers and spilled a few bytes (the
        # kernel report). torch.compile's launches of user kernels keep num_warps and num_stages
        # and drop this option: correct, possibly with those few bytes of spill.
        "maxnreg": whole_register_file(cfg.num_warps),
    }


def uses_tensor_cores(u: torch.Tensor, precision: str) -> bool:
    """The routing passes' products run on tensor cores: half-precision inputs, or float32 as TF32
    or 3xTF32."""
    return u.dtype != torch.float32 or precision != "ieee"


def float16_as_float32(u: torch.Tensor, weight: torch.Tensor, precision: str):
    """float16 inputs run the float32 passes: ``u`` and the weight as float32 copies (exact), the
    products as 3xTF32 (a float16 number is exact in TF32, so u W is exact and a float32 factor
    times W as accurate as IEEE float32). The half path splits float32 factors (gradients of s,
    coupling-weighted inputs) into two numbers of the input type, and float16's range (2^-24 ..
    65504) cannot hold them: gradients lost to underflow or turned to NaN by overflow where the
    true du and dw are finite float16 numbers (found by break-testing). bfloat16, with float32's
    range, keeps the half path. The outputs keep float16 (each rounded once, as stored)."""
    if u.dtype != torch.float16:
        return u, weight, precision
    return u.float(), weight.float(), "tf32x3"
