"""bench/issue_model.py: the SASS loop parser and dynamic instruction count on hand-written SASS
and PTX, and on one real kernel compiled for sm_90 (in a subprocess without TRITON_INTERPRET,
which conftest switches on in this process when there is no GPU: the compiler must not see it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import issue_model  # noqa: E402
import kernel_report  # noqa: E402

# An outer loop (0x30-0xd0) around an inner loop that ptxas unrolled twice (0x40-0x70, two loads)
# with its remainder loop (0x80-0xa0, one load); a CALL to a slow-path subroutine after EXIT and
# the trailing self-branch are never counted.
SASS = """
        code for sm_90a
                Function : k
        /*0000*/                   MOV R0, RZ ;                                     /* 0x0 */
        /*0010*/                   ISETP.GE.AND P0, PT, R2, 0x1, PT ;
        /*0020*/              @!P0 BRA 0x140 ;
        /*0030*/                   LDG.E R4, desc[UR4][R6.64] ;
        /*0040*/                   LDG.E R5, desc[UR4][R8.64] ;
        /*0050*/                   LDG.E R9, desc[UR4][R8.64+0x4] ;
        /*0060*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*0070*/               @P1 BRA 0x40 ;
        /*0080*/                   LDG.E R5, desc[UR4][R8.64] ;
        /*0090*/                   FADD R10, R10, R5 ;
        /*00a0*/               @P2 BRA 0x80 ;
        /*00b0*/                   CALL.REL.NOINC 0x180 ;
        /*00c0*/                   ISETP.NE.AND P0, PT, R0, R2, PT ;
        /*00d0*/               @P0 BRA 0x30 ;
        /*0140*/                   STG.E desc[UR4][R6.64], R10 ;
        /*0150*/                   EXIT ;
        /*0160*/                   BRA 0x160;
        /*0180*/                   FADD R5, R5, R5 ;
        /*0190*/                   RET.REL.NODEC R20 0x0 ;
"""

# The same loops in PTX, laid out as LLVM does: the outer loop's latch block ($L__BB0_4) before its
# header ($L__BB0_2), so that only the control-flow graph, not the line ranges, shows the nesting.
PTX = """
.visible .entry k()
{
	mov.u32 	%r1, 0;
	@%p1 bra 	$L__BB0_5;
	bra.uni 	$L__BB0_2;
$L__BB0_4:
	add.s32 	%r1, %r1, 1;
	@%p2 bra 	$L__BB0_5;
$L__BB0_2:
	ld.global.b32 	%r2, [%rd1];
$L__BB0_3:
	ld.global.b32 	%r3, [%rd2];
	@%p3 bra 	$L__BB0_3;
	bra.uni 	$L__BB0_4;
$L__BB0_5:
	ret;
}
"""
RULE = [("outer", [("inner", [])])]


def test_parser_finds_the_nested_loops_and_the_reachable_code():
    instrs = issue_model.parse_sass(SASS, "k")
    assert len(instrs) == 19 and instrs[2].pred == "@!P0" and instrs[2].target == 0x140
    program = issue_model.analyse(instrs)
    assert program.unreached == 3  # the trailing BRA and the subroutine
    assert [(lp.head, lp.tail) for lp in program.loops] == [(0x30, 0xD0), (0x40, 0x70), (0x80, 0xA0)]
    (outer,) = program.roots
    assert [(lp.head, lp.loads) for lp in outer.children] == [(0x40, 2), (0x80, 1)]
    assert outer.loads == 1  # its own load, outside the inner loops

    ptx = issue_model.ptx_loops(PTX)
    assert len(ptx) == 1 and len(ptx[0].children) == 1
    assert (ptx[0].loads, ptx[0].children[0].loads) == (1, 1)

    assert issue_model.match_rule(program, ptx, RULE) is None
    assert issue_model.tree_text(program.roots) == "[outer[inner/2, inner%2]]"


def test_dynamic_count_multiplies_the_trip_counts_of_the_enclosing_loops():
    program = issue_model.analyse(issue_model.parse_sass(SASS, "k"))
    assert issue_model.match_rule(program, issue_model.ptx_loops(PTX), RULE) is None
    # 5 instructions outside the loops, 4 in the outer loop's own body, 4 in the inner loop
    # unrolled twice (5 // 2 = 2 trips), 3 in its remainder loop (5 % 2 = 1 trip)
    counts = program.count({"outer": 3, "inner": 5})
    assert counts["total"] == 5 + 3 * (4 + 2 * 4 + 1 * 3)
    assert counts["mma"] == 3 * 2
    assert counts["mma_cycles"] == 3 * 2 * 8  # HMMA.16816: 2048 multiply-adds at 256 a cycle
    assert program.count({"outer": 0, "inner": 5})["total"] == 5


def test_opcode_counts_partition_the_total():
    program = issue_model.analyse(issue_model.parse_sass(SASS, "k"))
    assert issue_model.match_rule(program, issue_model.ptx_loops(PTX), RULE) is None
    counts = program.count({"outer": 3, "inner": 5})
    ops = {k[len(issue_model.OPCODE):]: n for k, n in counts.items() if k.startswith(issue_model.OPCODE)}
    assert sum(ops.values()) == counts["total"]
    # loads: 3 outer trips x (1 own + 2 inner trips x 2 unrolled + 1 remainder trip x 1)
    assert ops["LDG"] == 3 * (1 + 2 * 2 + 1)
    assert ops["HMMA"] == counts["mma"] == 3 * 2
    assert ops["FADD"] == 3 * 1  # the subroutine's FADD is never reached
    assert ops["STG"] == ops["EXIT"] == 1


def test_opcode_text_lists_the_largest_per_example():
    def launch(kernel, opcodes, modelled=True):
        row = issue_model.LaunchModel(kernel, "X=1", "forward", 8, 4, 16, modelled=modelled)
        row.opcodes = opcodes
        return row

    case = {
        "meta": {"batch": 10},
        "launches": [
            launch("k_kernel", {"FFMA": 300, "LDG": 100}),
            launch("k_kernel", {"FFMA": 100, "STG": 50, "LDG": 50}),  # a second launch, summed
            launch("other_kernel", {"BRA": 7}, modelled=False),  # not modelled: left out
        ],
    }
    text = issue_model.opcode_text(case, 2)
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[1].strip() == "forward k X=1: 60: FFMA 40 (67%), LDG 15 (25%)"


def test_a_loop_tree_unlike_the_rule_is_not_modelled():
    program = issue_model.analyse(issue_model.parse_sass(SASS, "k"))
    ptx = issue_model.ptx_loops(PTX)
    assert "is not the expected" in issue_model.match_rule(program, ptx, [("outer", [])])
    assert "is not the expected" in issue_model.match_rule(program, ptx, [("a", []), ("b", [])])
    # the rule's shape, but the SASS is not the PTX with ptxas's unrolling: a second load in the
    # remainder loop makes it no remainder of the twice unrolled loop
    odd = SASS.replace("FADD R10, R10, R5", "LDG.E R10, desc[UR4][R8.64]")
    message = issue_model.match_rule(issue_model.analyse(issue_model.parse_sass(odd, "k")), ptx, RULE)
    assert "is not the PTX's" in message
    overlapping = SASS.replace("@P2 BRA 0x80", "@P2 BRA 0x60")
    with pytest.raises(issue_model.LoopShapeError, match="overlap"):
        issue_model.analyse(issue_model.parse_sass(overlapping, "k"))


def test_split_runs_and_mma_rates():
    # the last split of the input capsules is shorter; splits past the end own none
    assert issue_model._runs(1152, 100, 12) == [100] * 11 + [52]
    assert issue_model._runs(10, 4, 4) == [4, 4, 2, 0]
    tf32 = issue_model.Instr(0, "", "HMMA.1688.F32.TF32", "R0, R4, R8, R0")
    assert issue_model._mma_cycles(tf32) == 16 * 8 * 8 / 128


def _logits_launch(batch, n_out, grad, parts=False):
    """A recorded launch of the logits pass (the paper's layer's input capsules and tiles, float32;
    ``parts``: V and ds as their two float32 parts, 3xTF32)."""
    ints = dict(B=batch, N_in=1152, N_out=n_out, D=16, caps_per_split=24, r=1, slot=0)
    kwargs = {k: ("int", v) for k, v in ints.items()}
    kwargs.update(u_ptr=("tensor", "fp32"), w_ptr=("tensor", "fp32"), v_ptr=("tensor", "fp32"), BLOCK_B=64,
                  BLOCK_IC=8, BLOCK_KIN=8, BLOCK_DK=16, GRAD=grad, PARTS=parts)
    return kernel_report.Launch("", "fused_layer_logits_kernel", (batch // 64, 48), kwargs)


def test_logits_written_and_read_back_in_l2_cross_dram_once():
    """The logits pass writes a chunk's logits (and agreements) and rewrites them in place twice
    (exponentials, then coefficients; logit gradients): one DRAM write while the resident
    programs' chunks fit in L2, every read-back and rewrite too beyond."""
    batch, n_in, caps = 1024, 1152, 10 * 16
    streamed = batch * n_in * 8 * 4 + n_in * caps * 8 * 4  # u, W (float32, D_in 8)
    coupling = batch * 10 * n_in * 4
    fwd = issue_model.rule_chunked_pass(_logits_launch(batch, 10, False))
    assert fwd.bytes == streamed + batch * caps * 4 + coupling  # V read, the coefficients written once
    assert fwd.in_flight_per_program == 64 * 10 * 8 * 4
    assert issue_model.dram_bytes(fwd, 2 * 132) == fwd.bytes  # 5.4 MB in flight: in L2
    assert issue_model.dram_bytes(fwd, 10**4) == fwd.bytes + 4 * coupling  # 205 MB: 2 reads, 2 rewrites
    bwd = issue_model.rule_chunked_pass(_logits_launch(batch, 10, True))
    assert bwd.bytes == streamed + 2 * batch * caps * 4 + 2 * coupling  # V, ds; the logit gradients too
    assert issue_model.dram_bytes(bwd, 10**4) == bwd.bytes + 7 * coupling
    parts = issue_model.rule_chunked_pass(_logits_launch(batch, 10, True, parts=True))
    assert parts.bytes == bwd.bytes + 2 * batch * caps * 4  # V's and ds's lo parts too
    wide = issue_model.rule_chunked_pass(_logits_launch(batch, 128, True))
    assert issue_model.dram_bytes(wide, 2 * 132) > wide.bytes  # 128 classes: 138 MB in flight


# one real kernel: the fused layer's forward pass, iteration r > 0, on the rank-one path
_REAL = """
import dataclasses, json, sys
sys.path.insert(0, "bench")
import issue_model as m, kernel_report as k
case = [c for c in k.shape_sets()["all"] if c.label == "layer 1152x10x16x8 B=1024 R=3 float32 ieee"]
launch = next(lc for _, lc in m.first_training_step(k.record_launches(case))
              if lc.kernel == "fused_layer_fwd_kernel" and not lc.kwargs["FIRST"])
info = m.compile_sass(k.compilation_of(launch, k._kernels(), k.backend_cls()))
program = m.analyse(m.parse_sass(info["sass"], info["name"]))
why = m.match_rule(program, m.ptx_loops(info["ptx"]), m.RULES[launch.kernel](launch).shape)
per_program = [program.count({"splits": 15, "caps": c, "D_in": 8})["total"] for c in range(5)]
d_in_body = program.count({"splits": 0, "caps": 1, "D_in": 1})["total"] - program.count(
    {"splits": 0, "caps": 1, "D_in": 0})["total"]
launches = []
for caps in (8, 16, 24, 32):  # one split of `caps` capsules per example tile
    kw = {**launch.kwargs, "caps_per_split": ("int", caps), "SPLIT": ("int", 1)}
    one = m.model_launch(dataclasses.replace(launch, grid=(launch.grid[0], 1), kwargs=kw), info, 4e12, "forward")
    launches.append([one.modelled, one.warp_instrs, one.issue_s])
print(json.dumps({"why": why, "tree": m.tree_text(program.roots), "grid": launch.grid, "warps": info["num_warps"],
                  "per_program": per_program, "d_in_body": d_in_body, "launches": launches}))
"""


@pytest.fixture(scope="module")
def real_kernel(tmp_path_factory):
    try:
        tools = all(os.path.exists(kernel_report._tool(t)) for t in ("ptxas", "cuobjdump"))
    except Exception:
        tools = False
    if not tools:
        pytest.skip("triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    proc = subprocess.run([sys.executable, "-c", _REAL], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_real_kernel_loop_tree_matches_its_rule(real_kernel):
    # sum_splits over the previous iteration's partials (possibly unrolled by ptxas), then the
    # loop over the split's input capsules with the rank-one D_in loop inside
    assert real_kernel["why"] is None, real_kernel
    tree = real_kernel["tree"]
    assert tree in ("[splits, caps[D_in]]",) or (tree.startswith("[splits/") and tree.endswith(", caps[D_in]]"))
    assert real_kernel["warps"] == 8 and real_kernel["grid"] == [64, 16]


def test_real_kernel_count_grows_linearly_with_the_capsules_per_split(real_kernel):
    counts = real_kernel["per_program"]
    slope = counts[1] - counts[0]
    # one capsule costs its own body plus D_in = 8 trips of the inner loop
    assert slope > 8 * real_kernel["d_in_body"] > 0
    assert counts == [counts[0] + c * slope for c in range(5)]
    launches = real_kernel["launches"]
    assert all(modelled for modelled, _, _ in launches)
    instrs = [w for _, w, _ in launches]
    step = instrs[1] - instrs[0]
    # 64 example tiles x 8 warps x 8 more capsules a program
    assert step == 64 * 8 * 8 * slope
    assert instrs == [instrs[0] + i * step for i in range(4)]
    assert launches[3][2] > launches[0][2] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--opcodes", "-3"], "argument --opcodes: must be >= 0, got -3"),
        (["--cases", ""], "argument --cases: an empty prefix would take every case"),
    ],
)
def test_bad_options_are_usage_errors(argv, message, capsys, monkeypatch):
    """Break-testing: a negative --opcodes printed nothing, and an empty --cases prefix took every
    case (a run of many minutes)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        issue_model.main(argv)
    assert message in capsys.readouterr().err
