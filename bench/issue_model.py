"""Static instruction-issue model: predicted H200 time of capstriton's kernels from their sm_90 SASS.

No GPU is used. For each chosen case of the bench specs (``kernel_cases``), the launches the ops
really make are recorded on fake CUDA tensors and compiled for sm_90 exactly as
``bench/kernel_report.py`` does (its ``record_launches`` and ``compilation_of``); the SASS comes
from ``cuobjdump -sass`` of each cubin. Then, per launch:

1. Loops. The SASS is parsed into instructions with addresses. A loop is a backward branch (a
   ``BRA`` whose target lies below it); its body is every instruction from the target to the
   branch (branches to the same target are one loop). Loops nest by address range; ranges that
   overlap without nesting are an error. Only code reachable from the entry, without following
   ``CALL``, is counted: the subroutines after ``EXIT`` are the slow paths of IEEE division and
   square root (subnormal or huge operands), counted as never run.

   ptxas unrolls some loops: the body appears U times in one SASS iteration, the remaining
   iterations peeled into straight code after the loop or left to a remainder loop. So the loops
   are also read from the PTX that ptxas compiled (the natural loops of its control-flow graph:
   the source loops as triton and LLVM left them), and each SASS loop without inner loops is
   matched to its PTX loop by global loads: U = the SASS body's LDG / the PTX body's ld.global (an
   integer, else "not modelled"). A loop unrolled U times runs n // U trips for n source
   iterations, its remainder loop at most n % U; the peeled copies count once (upper bounds, off
   by less than U - 1 bodies per entry into the loop).

2. Dynamic count. Each kernel has a rule, written from its source (``kernels/*.py``), giving the
   expected loop tree (its source loops in order: e.g. ``fused_layer_fwd_kernel`` is a
   ``sum_splits`` loop over the SPLIT-1 partials when r > 0, then the loop over its run of input
   capsules containing, on the rank-one path (USE_DOT false), the loop over D_in, absent when
   D_in = 1 is specialised into a constant) and each loop's trip count per program from the
   launch's recorded integer arguments and grid (the last split of the input capsules, or the
   last group of example tiles, may hold fewer: trips are exact per program). A kernel whose PTX
   loop tree does not have the expected shape, or whose SASS loop tree is not the PTX's with
   ptxas's unrolling, is reported "not modelled", not guessed. Warp instructions per program = sum
   over instructions of the product of the trip counts of the loops containing it: every
   instruction inside a loop counts on every trip, both sides of a forward branch count (an upper
   bound: e.g. the stores only program 0 of a tile makes), and predicated-off instructions still
   issue.

3. Bounds of a launch (H200 SXM: 132 SMs, 4 schedulers each, 1.98 GHz boost clock):

   - issue: warp instructions (per program x warps per program x programs) / (132 x 4 x 1.98e9)
     (one warp instruction per scheduler per cycle), times the wave quantisation
     ceil(P / 132) / (P / 132) of P programs (the busiest SM runs ceil(P / 132) of them);
   - tensor: MMA instructions at the mma.sync rate. Assumption: Hopper's legacy ``mma.sync``
     (SASS HMMA, what triton emits for these small tiles) runs at about the A100 per-SM rate,
     half the ``wgmma`` dense peak: 256 FP16/BF16 and 128 TF32 multiply-adds per cycle per SM
     sub-partition, so HMMA.16816 (2048 multiply-adds) takes 8 cycles and HMMA.1688.TF32 8
     cycles (dense H100/H200 peak 989 TFLOPS BF16 = 512 per cycle per sub-partition with wgmma;
     microbenchmarks report mma.sync near half of it: Luo et al., "Benchmarking and Dissecting
     the Nvidia Hopper GPU Architecture", arXiv 2402.13499). HGMMA, should it appear, at the full
     wgmma rate (512 / 256 per cycle per sub-partition), a quarter of its m x n x k per warp;
   - memory: the bytes the launch must move at least (the tensor it streams: u_hat for the routing
     passes, u and the weight for the fused passes, their gradients written by the final passes,
     the per-split partial sums and saved [B, N_out, D] states) at the H200 copy bandwidth
     measured by the sweep (``copy_bandwidth_bytes_per_s`` of
     ``bench/results/nvidia-h200/results.json``, 4.15e12 B/s). What a program writes and reads
     back or overwrites within one chunk (the logits pass's logits and agreements) crosses DRAM
     once while the resident programs' chunks fit in half the 50 MB L2, else every time.

   A launch takes max(issue, tensor, memory); an op (forward, or forward+backward) the sum over
   its launches, or the op's analytic minimum bytes (the spec's ``min_bytes_per_example`` x B) at
   the copy bandwidth where larger. The occupancy (resident warps per SM from registers and
   shared memory, ``kernel_report.occupancy``) is reported beside it: with 8 warps a program and
   255 registers a thread one program fits an SM, two warps per scheduler, too few to hide
   latency, which no bound above sees.

4. Calibration. The raw model assumes every scheduler issues every cycle. The efficiency factor
   is fitted on the routing op (``ct.dynamic_routing``, float32, B = 1024), the one op whose
   triton kernels have H200 timings committed (``results.json``: forward 1,213,546 and
   forward+backward 337,652 examples/s), measured at an older commit (b59a9d2): the kernels have
   changed since (NOTES.md lists how), so the fit is indicative. efficiency = raw time / measured
   time, per mode; the factor used is their geometric mean, and predicted time = raw time /
   efficiency.

5. Output. Per case a table (kernel, launches, programs, warps, resident warps per SM, dynamic
   warp instructions and MMA per example, issue / tensor / memory bound in microseconds, which
   dominates), its loop trees, and per op and mode (forward; forward+backward when every launch is
   modelled, the spec cases' first training step, grad_through_routing=True) the raw and predicted
   examples/s at the case's batch size, next to the spec's targets for the sizes the sweep timed
   at B = 1024 (fused layer forward >= 4 M examples/s float32, >= 10 M bfloat16;
   forward+backward >= 10x eager, eager from results.json; self-attention layer forward >= 5x
   eager, eager not measured on a GPU). ``--out DIR`` writes ``issue_model.json`` (each launch's
   dynamic warp instructions by SASS opcode included); ``--opcodes N`` also prints, per kernel
   and variant, the N most frequent opcodes an example: where a pass's instructions go (address
   arithmetic, loads and stores, the arithmetic itself).

    python bench/issue_model.py                                 # the default cases
    python bench/issue_model.py --cases "layer 1152x10x16x8 B=1024" --out /tmp/model
    python bench/issue_model.py --cases "layer 1152x10x16x8 B=1024 R=3 bfloat16" --opcodes 12

Limits: a PTX loop is taken as one source iteration per trip (triton and LLVM leave these loops
with runtime trip counts alone); memory latency, barrier waits, shared-memory and L2 traffic,
dependent-instruction stalls at low occupancy and launch overhead (a few microseconds a launch)
are only in the fitted factor, which comes from one op.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

if __name__ == "__main__":
    # before triton is imported: the compiler must not see the interpreter, and every kernel is
    # compiled into a private, empty cache
    os.environ.pop("TRITON_INTERPRET", None)
    _CACHE = tempfile.TemporaryDirectory(prefix="capstriton-issue-model-")
    os.environ["TRITON_CACHE_DIR"] = _CACHE.name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "nvidia-h200", "results.json")

#: H200 SXM: SMs, warp schedulers per SM (one warp instruction a cycle each), boost clock
SMS = 132
SCHEDULERS = 4
CLOCK_HZ = 1.98e9
#: H100/H200 SXM L2 cache (NVIDIA's Hopper architecture whitepaper: 50 MB). Data a program writes
#: and reads back or overwrites soon after crosses DRAM once while the resident programs' share
#: of it stays under half of this (the rest for the streamed operands)
L2_BYTES = 50e6
#: multiply-adds per cycle per SM sub-partition (see the module docstring): mma.sync (HMMA) at
#: half the wgmma (HGMMA) dense rate
MMA_RATE = {("HMMA", "half"): 256, ("HMMA", "tf32"): 128, ("HGMMA", "half"): 512, ("HGMMA", "tf32"): 256}
#: the committed H200 timings of the routing op (triton, float32, B = 1024) and their commit
CALIBRATION_CASE = "routing 1152x10x16 B=1024 R=3 float32"
MEASURED_AT = "b59a9d2"
DEFAULT_CASES = (
    CALIBRATION_CASE,
    "layer 1152x10x16x8 B=1024 R=3 float32 tf32x3",  # the default at "highest"
    "layer 1152x10x16x8 B=1024 R=3 float32 ieee",  # IEEE FMAs, the default before 3xTF32
    "layer 1152x10x16x8 B=1024 R=3 bfloat16",
    "attention-layer 1152x10x16x8 B=1024 float32 tf32x3",
    "attention-layer 1152x10x16x8 B=1024 float32 ieee",
    "attention-layer 16x10x16x8 B=1024 bfloat16",
)
MODES = ("forward", "forward+backward")
#: the batch size at which the bench judges the targets (bench/results/nvidia-h200/NOTES.md)
TARGET_BATCH = 1024

# ---------------------------------------------------------------------------------------------
# SASS: instructions, reachability, loops


class LoopShapeError(Exception):
    """The control flow is not a tree of loops this model can count."""


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str  # "" or the guard, e.g. "@!P0"
    op: str  # e.g. "BRA", "LDG.E.128"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def target(self) -> int | None:
        """The branch target of BRA / CALL, None for other instructions."""
        if self.base not in ("BRA", "CALL"):
            return None
        m = re.findall(r"0x([0-9a-f]+)", self.args)
        return int(m[-1], 16) if m else None

    @property
    def unconditional(self) -> bool:
        return self.pred in ("", "@PT")


_LINE_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", re.M)
_PRED_RE = re.compile(r"^(@!?U?P(?:\d+|T))\s+(.*)$")


def parse_sass(text: str, function: str | None = None) -> list[Instr]:
    """Instructions of one function (``function``, else the first) of ``cuobjdump -sass`` text."""
    sections = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.M)
    if len(sections) > 1:
        bodies = dict(zip(sections[1::2], sections[2::2], strict=True))
        if function is not None and function not in bodies:
            raise ValueError(f"no function {function} in the SASS ({sorted(bodies)})")
        text = bodies[function] if function is not None else sections[2]
    instrs = []
    for m in _LINE_RE.finditer(text):
        body = m.group(2).strip()
        pred = ""
        pm = _PRED_RE.match(body)
        if pm:
            pred, body = pm.groups()
        op, _, args = body.partition(" ")
        instrs.append(Instr(int(m.group(1), 16), pred, op, args.strip()))
    if not instrs:
        raise ValueError("no SASS instructions found")
    return instrs


def reachable(instrs: list[Instr]) -> list[bool]:
    """Instructions reachable from the entry by falling through and branching (CALLs not followed:
    their callees are the slow-path subroutines)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    seen = [False] * len(instrs)
    todo = [0]
    while todo:
        i = todo.pop()
        while i < len(instrs) and not seen[i]:
            seen[i] = True
            ins = instrs[i]
            if ins.base == "BRX" or ins.base == "JMX":
                raise LoopShapeError(f"indirect branch at {ins.addr:#x}")
            if ins.base == "BRA":
                if ins.target not in index:
                    raise LoopShapeError(f"branch at {ins.addr:#x} to {ins.target} outside the function")
                todo.append(index[ins.target])
                if ins.unconditional and ins.op in ("BRA", "BRA.U"):  # not BRA.DIV and the like
                    break
            elif ins.base in ("EXIT", "RET") and ins.unconditional:
                break
            i += 1
    return seen


@dataclass
class Loop:
    head: int  # address (SASS) or line (PTX) of the first instruction of the body
    tail: int  # address or line of the (last) backward branch
    children: list[Loop] = field(default_factory=list)
    loads: int = 0  # global loads in the body outside its inner loops (LDG / ld.global)
    key: str | None = None  # the source loop (trip-count name) a rule matched it to
    #: source iterations per SASS iteration: ptxas unrolled the loop (the PTX body's loads appear
    #: ``unroll`` times), its remainder peeled into straight code after it or left to a remainder
    #: loop
    unroll: int = 1
    #: for such a remainder loop, the unroll factor of the main loop before it (0: not one)
    rest_of: int = 0

    def trips(self, n: int) -> int:
        """SASS iterations of this loop for ``n`` source iterations (a remainder loop: at most)."""
        return (n % self.rest_of) // self.unroll if self.rest_of else n // self.unroll


def nest_loops(spans: dict[int, int]) -> tuple[list[Loop], list[Loop]]:
    """Roots and the address-ordered list of the loops ``{head: tail}``, nested by range."""
    loops = sorted((Loop(h, t) for h, t in spans.items()), key=lambda lp: (lp.head, -lp.tail))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for lp in loops:
        while stack and stack[-1].tail < lp.head:
            stack.pop()
        if stack and lp.tail > stack[-1].tail:
            raise LoopShapeError(f"loops {stack[-1].head:#x}-{stack[-1].tail:#x} and {lp.head:#x}-{lp.tail:#x} overlap")
        (stack[-1].children if stack else roots).append(lp)
        stack.append(lp)
    return roots, loops


@dataclass
class Program:
    """One compiled kernel's SASS, analysed: its loop tree and, per nest of loops, the counts of
    the reachable instructions in it."""

    instrs: list[Instr]
    roots: list[Loop]
    loops: list[Loop]  # every loop, in address order
    #: loop indices (outermost first) -> Counter(total=..., mma=..., mma_cycles=...)
    nests: dict[tuple[int, ...], Counter]
    unreached: int  # instructions not counted (slow-path subroutines, the trailing padding)

    def count(self, trips: dict[str, int]) -> Counter:
        """Dynamic warp instructions (and MMA) of one program with these trip counts by loop key."""
        out: Counter = Counter()
        for nest, counts in self.nests.items():
            factor = 1
            for i in nest:
                factor *= self.loops[i].trips(trips[self.loops[i].key])
            for name, n in counts.items():
                out[name] += n * factor
        return out


#: the prefix of the per-opcode counts in ``Program.nests`` (``OPCODE + "FFMA"``: FFMA instructions)
OPCODE = "op:"


def _mma_cycles(ins: Instr) -> float:
    """Cycles one MMA warp instruction keeps its sub-partition's tensor core busy (0: not an MMA)."""
    if ins.base not in ("HMMA", "HGMMA"):
        return 0.0
    parts = ins.op.split(".")
    kind = "tf32" if "TF32" in parts else "half"
    if ins.base == "HGMMA":
        m, n, k = (int(x) for x in re.match(r"(\d+)x(\d+)x(\d+)", parts[1]).groups())
        fma = m * n * k / 4  # a warpgroup instruction, issued by each of its 4 warps
    else:
        shape = parts[1]  # "16816" = m16 n8 k16, "1688", "1684"
        m, n, k = (16, 8, int(shape[3:])) if shape.startswith("168") else (8, 8, int(shape[2:]))
        fma = m * n * k
    return fma / MMA_RATE[(ins.base, kind)]


def analyse(instrs: list[Instr]) -> Program:
    """Loops (backward branches) of the reachable SASS, nested by address range, and the
    instruction counts per nest."""
    live = reachable(instrs)
    spans: dict[int, int] = {}
    for ins, ok in zip(instrs, live, strict=True):
        t = ins.target if ins.base == "BRA" else None
        if ok and t is not None and t < ins.addr:
            spans[t] = max(spans.get(t, t), ins.addr)
    roots, loops = nest_loops(spans)
    nests: dict[tuple[int, ...], Counter] = {}
    for ins, ok in zip(instrs, live, strict=True):
        if not ok:
            continue
        nest = tuple(i for i, lp in enumerate(loops) if lp.head <= ins.addr <= lp.tail)
        c = nests.setdefault(nest, Counter())
        c["total"] += 1
        c[OPCODE + ins.base] += 1
        if ins.base == "LDG" and nest:
            loops[nest[-1]].loads += 1
        cycles = _mma_cycles(ins)
        if cycles:
            c["mma"] += 1
            c["mma_cycles"] += cycles
    return Program(instrs, roots, loops, nests, live.count(False))


_PTX_LABEL_RE = re.compile(r"^\s*(\$L__BB\d+_\d+):")
_PTX_BRA_RE = re.compile(r"^\s*(@!?%p\d+\s+)?bra(?:\.uni)?\s+(\$L__BB\d+_\d+)\s*;")


def ptx_loops(ptx: str) -> list[Loop]:
    """The loop tree of the PTX (the source loops as triton and LLVM left them, before ptxas): the
    natural loops of its control-flow graph (LLVM places a loop's latch block anywhere, so address
    ranges do not nest), siblings in the order of their headers, each with the global loads of its
    body outside its inner loops. ``head`` and ``tail`` are line numbers."""
    lines = ptx.splitlines()
    blocks: list[dict] = [{"label": None, "lines": [], "targets": [], "falls": True}]
    for n, line in enumerate(lines):
        m = _PTX_LABEL_RE.match(line)
        if m:
            blocks.append({"label": m.group(1), "lines": [], "targets": [], "falls": True})
            continue
        blocks[-1]["lines"].append(n)
        b = _PTX_BRA_RE.match(line)
        if b or re.match(r"^\s*(ret|exit)\s*;", line):
            if b:
                blocks[-1]["targets"].append(b.group(2))
            blocks[-1]["falls"] = bool(b and b.group(1))  # a predicated branch falls through
            blocks.append({"label": None, "lines": [], "targets": [], "falls": True})
    index = {blk["label"]: i for i, blk in enumerate(blocks) if blk["label"]}
    succ = [
        [index[t] for t in blk["targets"]] + ([i + 1] if blk["falls"] and i + 1 < len(blocks) else [])
        for i, blk in enumerate(blocks)
    ]
    preds: list[list[int]] = [[] for _ in blocks]
    for i, ss in enumerate(succ):
        for j in ss:
            preds[j].append(i)
    # dominators of the blocks reachable from the entry (iterative data flow)
    live, todo = {0}, [0]
    while todo:
        for j in succ[todo.pop()]:
            if j not in live:
                live.add(j)
                todo.append(j)
    dom = {i: set(live) for i in live}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for i in sorted(live - {0}):
            new = {i} | set.intersection(*(dom[p] for p in preds[i] if p in live))
            if new != dom[i]:
                dom[i], changed = new, True
    # natural loops: a back edge u -> h (h dominates u) and every block reaching u without h
    bodies: dict[int, set[int]] = {}
    for u in live:
        for h in succ[u]:
            if h in dom[u]:
                body = bodies.setdefault(h, {h})
                todo = [u]
                while todo:
                    x = todo.pop()
                    if x not in body:
                        body.add(x)
                        todo.extend(p for p in preds[x] if p in live)
    first = {i: (blocks[i]["lines"] or [0])[0] for i in range(len(blocks))}
    loops = {
        h: Loop(first[h], max(n for b in body for n in blocks[b]["lines"] or [first[h]])) for h, body in bodies.items()
    }
    roots: list[Loop] = []
    for h in sorted(bodies, key=lambda h: first[h]):
        outer = [g for g in bodies if g != h and bodies[h] < bodies[g]]
        if outer:
            parent = min(outer, key=lambda g: len(bodies[g]))
            loops[parent].children.append(loops[h])
        else:
            roots.append(loops[h])
    for h, body in bodies.items():
        inner = set().union(*(bodies[g] for g in bodies if g != h and bodies[g] < body))
        loops[h].loads = sum(
            1 for b in body - inner for n in blocks[b]["lines"] if re.search(r"\bld\.global\b", lines[n])
        )
    return roots


def tree_text(loops: list[Loop]) -> str:
    """``[a, b[c]]`` -style text of a loop tree, with each loop's key (or head address); ``/U`` a
    loop unrolled U times, ``%U`` the remainder loop of one."""

    def name(lp: Loop) -> str:
        out = lp.key or hex(lp.head)
        out += f"/{lp.unroll}" if lp.unroll > 1 else ""
        return out + (f"%{lp.rest_of}" if lp.rest_of else "")

    return "[" + ", ".join(name(lp) + (tree_text(lp.children) if lp.children else "") for lp in loops) + "]"


def _same_shape(loops: list[Loop], expected: list) -> bool:
    return len(loops) == len(expected) and all(
        _same_shape(lp.children, e[1]) for lp, e in zip(loops, expected, strict=True)
    )


def _factor(sass: Loop, ptx: Loop) -> int | None:
    """Source iterations per iteration of a SASS loop without inner loops: its global loads over
    those of the PTX loop (ptxas copies the body U times when it unrolls)."""
    if ptx.loads == 0:
        return 1 if sass.loads == 0 else None
    if sass.loads == 0 or sass.loads % ptx.loads:
        return None
    return sass.loads // ptx.loads


def _map(sass: list[Loop], ptx: list[Loop]) -> list | None:
    """``(sass loop, ptx loop, unroll, rest_of)`` when the SASS siblings are the PTX siblings, each
    PTX loop without inner loops possibly unrolled by ptxas (a main loop and a remainder loop)."""
    if not ptx or not sass:
        return [] if not ptx and not sass else None
    p, s = ptx[0], sass[0]
    if p.children:
        inner = _map(s.children, p.children)
        rest = _map(sass[1:], ptx[1:]) if inner is not None else None
        return None if rest is None else [(s, p, 1, 0), *inner, *rest]
    if s.children:
        return None
    u = _factor(s, p)
    if u is not None:
        rest = _map(sass[1:], ptx[1:])
        if rest is not None:
            return [(s, p, u, 0), *rest]
    if u is not None and u > 1 and len(sass) > 1 and not sass[1].children:
        u2 = _factor(sass[1], p)
        rest = _map(sass[2:], ptx[1:]) if u2 is not None and u2 < u else None
        if rest is not None:
            return [(s, p, u, 0), (sass[1], p, u2, u), *rest]
    return None


def match_rule(program: Program, ptx: list[Loop], expected: list) -> str | None:
    """Name each SASS loop after its source loop; None when done, else why not. ``expected`` is the
    rule's loop tree, ``[(key, children), ...]`` in address order, which the PTX loop tree must
    have; the SASS tree must be the PTX tree with some loops unrolled by ptxas."""
    if not _same_shape(ptx, expected):
        return f"PTX loop tree {tree_text(ptx)} is not the expected {expected_text(expected)}"

    def name(loops, exp):
        for lp, (key, children) in zip(loops, exp, strict=True):
            lp.key = key
            name(lp.children, children)

    name(ptx, expected)
    found = _map(program.roots, ptx)
    if found is None:
        return f"SASS loop tree {tree_text(program.roots)} is not the PTX's {tree_text(ptx)} unrolled"
    for s, p, unroll, rest_of in found:
        s.key, s.unroll, s.rest_of = p.key, unroll, rest_of
    return None


def expected_text(expected: list) -> str:
    return "[" + ", ".join(k + (expected_text(c) if c else "") for k, c in expected) + "]"


# ---------------------------------------------------------------------------------------------
# rules: per kernel, the expected loop tree and the trip counts of every program


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _runs(total: int, per: int, count: int) -> list[int]:
    """Lengths of ``count`` runs of ``per`` items out of ``total`` (the last ones may be short)."""
    return [max(0, min(per, total - k * per)) for k in range(count)]


def _grouped(pairs) -> list[tuple[int, dict]]:
    """``(programs, trips)`` pairs with equal trips merged."""
    out: dict[str, list] = {}
    for n, trips in pairs:
        key = json.dumps(trips, sort_keys=True)
        out.setdefault(key, [0, trips])[0] += n
    return [(n, trips) for n, trips in out.values()]


@dataclass
class RuleResult:
    shape: list  # expected loop tree: [(key, children), ...]
    programs: list[tuple[int, dict]]  # (number of programs, trip counts by loop key)
    bytes: float  # bytes the launch must move at least
    # data a program writes and then reads back or overwrites within a short window: in flight
    # per resident program, and the DRAM bytes the re-reads and rewrites add when the resident
    # programs' in-flight data does not stay in L2 (see ``L2_BYTES``)
    in_flight_per_program: float = 0.0
    bytes_beyond_l2: float = 0.0


def _ints(launch) -> dict:
    return {k: v[1] for k, v in launch.kwargs.items() if isinstance(v, tuple) and v[0] in ("int", "bool")}


def _consts(launch) -> dict:
    return {k: v for k, v in launch.kwargs.items() if not isinstance(v, tuple)}


_ELT = {"fp32": 4, "fp16": 2, "bf16": 2}


def _elt(launch, arg: str) -> int:
    return _ELT[launch.kwargs[arg][1]]


def _vanishes(launch, arg: str) -> bool:
    """An int argument equal to 1 that triton specialises into a constexpr (it is not in the
    kernel's do_not_specialize): a loop over ``range(arg)`` or ``range(1, arg)`` is then unrolled
    or removed at compile time, and leaves no loop."""
    if _ints(launch).get(arg) != 1:
        return False
    fn, _ = kernel_report.process_kernels()[launch.kernel]
    return not next(p for p in fn.params if p.name == arg).do_not_specialize


def _split_programs(launch, extra: dict, block: int = 1) -> list[tuple[int, dict]]:
    """Programs of a pass gridded (example tiles or examples, splits): split k owns a run of
    caps_per_split input capsules (the last ones fewer), walked in ``block``-capsule tiles (the
    trip count "caps"); ``extra``: the trip counts of its other loops."""
    v = _ints(launch)
    rows, splits = launch.grid
    runs = _runs(v["N_in"], v["caps_per_split"], splits)
    return _grouped((rows, {**extra, "caps": _cdiv(c, block)}) for c in runs)


def rule_fused_pass(launch) -> RuleResult:
    """fused_layer_fwd / fused_layer_bwd_reduce / self_attention_routing_fwd and _bwd_reduce:
    grid (example tiles, SPLIT); [sum_splits over SPLIT-1 partials (forward, r > 0 / PHASE 1)],
    then the loop over the split's capsules containing, on the rank-one path, the D_in loop."""
    v, c = _ints(launch), _consts(launch)
    name = launch.kernel
    from_u = c.get("FROM_U", True)
    rank_one = not c.get("USE_DOT", False)  # the fused layer's forward pass: rank-one only
    inner = [("D_in", [])] if from_u and rank_one and not _vanishes(launch, "D_in") else []
    if name == "fused_layer_fwd_kernel":
        has_sum = not c["FIRST"]
    elif name == "self_attention_routing_fwd_kernel":
        has_sum = c["PHASE"] == 1
    else:
        has_sum = False
    shape = ([("splits", [])] if has_sum else []) + [("caps", inner)]
    programs = _split_programs(launch, {"splits": v["SPLIT"] - 1, "D_in": v.get("D_in", 1)})
    B, caps = v["B"], v["N_out"] * v["D"]
    if from_u:
        streamed = B * v["N_in"] * v["D_in"] * _elt(launch, "u_ptr") + v["N_in"] * caps * v["D_in"] * _elt(
            launch, "w_ptr"
        )
    else:
        streamed = B * v["N_in"] * caps * _elt(launch, "uh_ptr")
    partials = B * v["SPLIT"] * caps * 4 * (2 if has_sum else 1)  # written, and read when reduced
    saved = B * caps * 4 * 3  # saved states read and written (V, s, ds: at most a few blocks)
    return RuleResult(shape, programs, streamed + partials + saved)


def rule_chunked_pass(launch) -> RuleResult:
    """fused_layer_logits / fused_layer_sums / fused_layer_uniform_sums (the forward on tensor
    cores): grid (example tiles, SPLIT[, N_out or blocks of outputs]); split k owns a run of
    caps_per_split input capsules walked in BLOCK_IC-capsule chunks, each containing (logits) three
    loops over the output capsules: the logits, their exponentials, the coefficients (none where
    ``N_OUT`` unrolls them, the logits kept in registers)."""
    v, c = _ints(launch), _consts(launch)
    logits = launch.kernel == "fused_layer_logits_kernel"
    in_registers = c.get("N_OUT", 0) > 0  # the output capsules unrolled: no loops over them
    outputs = [] if (in_registers or _vanishes(launch, "N_out")) else [("outputs", [])] * 3
    shape = [("chunks", outputs if logits else [])]
    tiles, splits, *per_output = launch.grid
    runs = _runs(v["N_in"], v["caps_per_split"], splits)
    rows = tiles * math.prod(per_output)
    programs = _grouped((rows, {"chunks": _cdiv(n, c["BLOCK_IC"]), "outputs": v["N_out"]}) for n in runs)
    B, n_in, n_out = v["B"], v["N_in"], v["N_out"]
    caps = n_out * v["D"]
    kin = c["BLOCK_KIN"]  # u and W as the passes read them: D_in zero padded to a power of two
    streamed = B * n_in * kin * _elt(launch, "u_ptr") + n_in * caps * kin * _elt(launch, "w_ptr")
    grad = c.get("GRAD", False)
    coupling = B * n_out * n_in * 4  # [B, N_out, N_in]: the coefficients c (or, GRAD, the logit gradients g)
    if logits:
        # V (and ds) read (float32, or their two parts), c (and g) written once: a chunk's logits
        # (and agreements) are written, read back and overwritten in place by their exponentials,
        # these read back and overwritten by c (the agreements by g), all within the program's
        # chunk, so in L2 while the resident programs' chunks fit there; beyond, every pass
        # crosses DRAM
        chunk = c["BLOCK_B"] * n_out * c["BLOCK_IC"] * 4 * (2 if grad else 1)
        factor = _elt(launch, "v_ptr") * (2 if c.get("PARTS", False) else 1)
        moved = streamed + B * caps * factor * (2 if grad else 1) + coupling * (2 if grad else 1)
        if in_registers:  # c written once, nothing read back
            return RuleResult(shape, programs, moved)
        return RuleResult(shape, programs, moved, chunk, coupling * (4 + (3 if grad else 0)))
    # the coefficients (or the logit gradients) read (not at iteration 0: uniform), this split's
    # partial sums written
    uniform = launch.kernel == "fused_layer_uniform_sums_kernel"
    moved = streamed + (0 if uniform else coupling) + B * v["SPLIT"] * caps * 4
    return RuleResult(shape, programs, moved)


def rule_coupled_sums(launch) -> RuleResult:
    """fused_layer_coupled_sums (the bfloat16 forward's iterations after the first, one pass):
    grid (example tiles, SPLIT); split k owns a run of caps_per_split input capsules walked in
    BLOCK_IC-capsule chunks, every output capsule unrolled (N_OUT) inside: no loop but the chunks."""
    v, c = _ints(launch), _consts(launch)
    tiles, splits = launch.grid
    runs = _runs(v["N_in"], v["caps_per_split"], splits)
    programs = _grouped((tiles, {"chunks": _cdiv(n, c["BLOCK_IC"])}) for n in runs)
    B, n_in = v["B"], v["N_in"]
    caps = c["N_OUT"] * c["BLOCK_DK"]  # D_out = BLOCK_DK in this kernel
    kin = c["BLOCK_KIN"]
    # the weight in chunks (``fused_layer_weight_chunks``): N_in rounded up to whole chunks
    chunked = _cdiv(n_in, c["BLOCK_IC"]) * c["BLOCK_IC"]
    streamed = B * n_in * kin * _elt(launch, "u_ptr") + chunked * caps * kin * _elt(launch, "w_ptr")
    # V's two parts read, this split's partial sums written; the coefficients never leave the chip
    moved = streamed + B * caps * 2 * _elt(launch, "vparts_ptr") + B * v["SPLIT"] * caps * 4
    return RuleResult([("chunks", [])], programs, moved)


def rule_weight_chunks(launch) -> RuleResult:
    """fused_layer_weight_chunks (the weight laid out in chunks for the coupled sums, once a
    forward): grid (chunks, N_out), no loop; the weight read, its chunks written (zero padded to
    whole chunks and BLOCK_DK rows)."""
    v, c = _ints(launch), _consts(launch)
    chunks, n_out = launch.grid
    kin, elt = c["BLOCK_KIN"], _elt(launch, "w_ptr")
    moved = v["N_in"] * n_out * v["D"] * kin * elt + chunks * c["BLOCK_IC"] * n_out * c["BLOCK_DK"] * kin * elt
    return RuleResult([], [(math.prod(launch.grid), {})], moved)


def rule_chunked_final(launch) -> RuleResult:
    """fused_layer_bwd_input / fused_layer_bwd_weight (the final backward pass on tensor cores).
    Input gradient: grid (example tiles, SPLIT), loops chunks > output capsules > steps
    r_first..R-1. Weight gradient: grid (runs of capsules, N_out, batch groups), loops chunks >
    the group's example tiles > steps."""
    v, c = _ints(launch), _consts(launch)
    steps = v["R"] - v["r_first"]
    B, n_in, n_out = v["B"], v["N_in"], v["N_out"]
    caps = n_out * v["D"]
    kin = c["BLOCK_KIN"]
    runs_axis = 1 if launch.kernel == "fused_layer_bwd_input_kernel" else 0
    runs = _runs(n_in, v["caps_per_split"], launch.grid[runs_axis])
    u = B * n_in * kin * _elt(launch, "u_ptr")
    coupling = steps * B * n_out * n_in * 4 * (2 if c["GRAD_THROUGH"] else 1)  # c (and g) of every step
    saved = B * caps * 4 * 2 * v["R"]  # V and ds of every step
    if launch.kernel == "fused_layer_bwd_input_kernel":
        steps_loop = [("steps", [])]
        shape = [("chunks", steps_loop if _vanishes(launch, "N_out") else [("outputs", steps_loop)])]
        rows = launch.grid[0]
        programs = _grouped(
            (rows, {"chunks": _cdiv(n, c["BLOCK_IC"]), "outputs": n_out, "steps": steps}) for n in runs
        )
        moved = 2 * u + n_in * caps * kin * _elt(launch, "w_ptr") + coupling + saved  # u read, du written
    else:
        shape = [("chunks", [("tiles", [("steps", [])])])]
        _, outputs, groups = launch.grid
        tiles = _cdiv(B, c["BLOCK_B"])
        tile_runs = _runs(tiles, v["tiles_per_group"], groups)
        programs = _grouped(
            (outputs, {"chunks": _cdiv(n, c["BLOCK_IC"]), "tiles": t, "steps": steps}) for n in runs for t in tile_runs
        )
        moved = u + coupling + saved + groups * n_in * caps * v["D_in"] * 4  # the groups' parts of dW written
    return RuleResult(shape, programs, moved)


def rule_routing_pass(launch) -> RuleResult:
    """dynamic_routing_fwd / _bwd_reduce / _bwd_final: grid (B, SPLIT); [sum_splits (forward,
    r > 0)], the loop over the split's capsules in BLOCK_I tiles containing (the final pass, through
    routing) the loop over steps 1..R-1."""
    v, c = _ints(launch), _consts(launch)
    name = launch.kernel
    has_sum = name == "dynamic_routing_fwd_kernel" and not c["FIRST"]
    steps = name == "dynamic_routing_bwd_final_kernel" and c["GRAD_THROUGH"] and not _vanishes(launch, "R")
    inner = [("steps", [])] if steps else []
    shape = ([("splits", [])] if has_sum else []) + [("caps", inner)]
    splits = v.get("SPLIT", launch.grid[1])
    extra = {"splits": splits - 1, "steps": v.get("R", 1) - 1}
    programs = _split_programs(launch, extra, c["BLOCK_I"])
    B, caps = v["B"], v["N_out"] * v["D"]
    u_hat = B * v["N_in"] * caps * _elt(launch, "u_ptr")
    if name == "dynamic_routing_bwd_final_kernel":  # du_hat written, every step's saved blocks read
        moved = 2 * u_hat + B * caps * 4 * 2 * v["R"]
    else:  # the partials written (and the previous ones read), a few saved blocks
        moved = u_hat + B * splits * caps * 4 * (2 if has_sum else 1) + B * caps * 4 * 3
    return RuleResult(shape, programs, moved)


def rule_final_layer(launch) -> RuleResult:
    """fused_layer_bwd_final / self_attention_routing_bwd_final: grid (capsule runs, batch groups);
    the loop over the program's capsules, the loop over its group's example tiles inside, in which
    (rank-one path, from u) a D_in loop for the predictions, (fused layer, through routing) the loop
    over steps 1..R-1, and a D_in loop for the input gradients."""
    v, c = _ints(launch), _consts(launch)
    from_u = c.get("FROM_U", True)
    rank_one = from_u and not c.get("USE_DOT", False) and not _vanishes(launch, "D_in")
    inner = [("D_in", [])] if rank_one else []
    if launch.kernel == "fused_layer_bwd_final_kernel" and c["GRAD_THROUGH"] and not _vanishes(launch, "R"):
        inner.append(("steps", []))
    inner += [("D_in", [])] if rank_one else []
    shape = [("caps", [("tiles", inner)])]
    n_s, n_g = launch.grid
    tiles = _cdiv(v["B"], c["BLOCK_B"])
    caps_runs = _runs(v["N_in"], v["caps_per_split"], n_s)
    tile_runs = _runs(tiles, v["tiles_per_group"], n_g)
    extra = {"D_in": v.get("D_in", 1), "steps": v.get("R", 1) - 1}
    programs = _grouped((1, {**extra, "caps": cs, "tiles": ts}) for cs in caps_runs for ts in tile_runs)
    B, caps = v["B"], v["N_out"] * v["D"]
    if from_u:
        u = B * v["N_in"] * v["D_in"] * _elt(launch, "u_ptr")
        moved = 2 * u + v["N_in"] * caps * v["D_in"] * (_elt(launch, "w_ptr") + 4 * n_g)  # u, du; W, dW parts
    else:
        moved = 2 * B * v["N_in"] * caps * _elt(launch, "uh_ptr")  # u_hat, du_hat
    return RuleResult(shape, programs, moved + B * caps * 4 * 2 * v.get("R", 1))


def rule_sum_splits(launch) -> RuleResult:
    """Per-example (or per-block) kernels around a sum over SPLIT (or G) partials, nothing else:
    dynamic_routing_finalize / _bwd_sum, self_attention_routing_finalize, fused_layer_bwd_dw_sum."""
    v = _ints(launch)
    n = v["G"] if "G" in v else v["SPLIT"]
    programs = [(math.prod(launch.grid), {"splits": n - 1})]
    if "numel" in v:
        moved = v["numel"] * (4 * n + _elt(launch, "dw_ptr"))
    else:
        # the partials read and two [N_out, D] blocks written (s and v; dV's running sum read and
        # written); the state kernel also reads V_{r-1} (and writes V_r's parts)
        blocks = n + (3 if launch.kernel == "fused_layer_state_kernel" else 2)
        moved = v["B"] * v["N_out"] * v["D"] * (4 * blocks + _parts_bytes(launch, "vparts_ptr", "PARTS"))
    return RuleResult([("splits", [])], programs, moved)


def _parts_bytes(launch, arg: str, flag: str) -> int:
    """Bytes an element of a factor's two parts takes (``factor_parts``), 0 where ``flag`` is off."""
    return 2 * _elt(launch, arg) if _consts(launch).get(flag, False) else 0


def rule_no_loop(launch) -> RuleResult:
    """Kernels without a loop: fused_layer_bwd_ds, self_attention_routing_bwd_ds, squash."""
    v = _ints(launch)
    if "N_out" in v:
        # fused_layer_bwd_ds: dv and s read, ds written; V_r read and split, ds_r split, for the
        # logits pass that follows (PARTS, DS_PARTS)
        split = _parts_bytes(launch, "vparts_ptr", "PARTS") + _parts_bytes(launch, "dsparts_ptr", "DS_PARTS")
        moved = v["B"] * v["N_out"] * v["D"] * (4 * 3 + split + (4 if _consts(launch).get("PARTS", False) else 0))
    else:
        moved = v["R"] * v["D"] * 4 * 3
    return RuleResult([], [(math.prod(launch.grid), {})], moved)


RULES = {
    "fused_layer_fwd_kernel": rule_fused_pass,
    "fused_layer_bwd_reduce_kernel": rule_fused_pass,
    "fused_layer_logits_kernel": rule_chunked_pass,
    "fused_layer_sums_kernel": rule_chunked_pass,
    "fused_layer_uniform_sums_kernel": rule_chunked_pass,
    "fused_layer_coupled_sums_kernel": rule_coupled_sums,
    "fused_layer_weight_chunks_kernel": rule_weight_chunks,
    "fused_layer_state_kernel": rule_sum_splits,
    "fused_layer_bwd_input_kernel": rule_chunked_final,
    "fused_layer_bwd_weight_kernel": rule_chunked_final,
    "self_attention_routing_fwd_kernel": rule_fused_pass,
    "self_attention_routing_bwd_reduce_kernel": rule_fused_pass,
    "dynamic_routing_fwd_kernel": rule_routing_pass,
    "dynamic_routing_bwd_reduce_kernel": rule_routing_pass,
    "dynamic_routing_bwd_final_kernel": rule_routing_pass,
    "fused_layer_bwd_final_kernel": rule_final_layer,
    "self_attention_routing_bwd_final_kernel": rule_final_layer,
    "dynamic_routing_finalize_kernel": rule_sum_splits,
    "dynamic_routing_bwd_sum_kernel": rule_sum_splits,
    "self_attention_routing_finalize_kernel": rule_sum_splits,
    "fused_layer_bwd_dw_sum_kernel": rule_sum_splits,
    "fused_layer_bwd_ds_kernel": rule_no_loop,
    "self_attention_routing_bwd_ds_kernel": rule_no_loop,
    "squash_fwd_kernel": rule_no_loop,
    "squash_bwd_kernel": rule_no_loop,
}

# ---------------------------------------------------------------------------------------------
# compiling (as kernel_report.compile_one, keeping the SASS text)


def compile_sass(comp: dict, arch: str = "sm_90") -> dict:
    """Compile one configuration (``kernel_report.compilation_of``) for ``arch``: its SASS text,
    warps, registers, shared memory and occupancy."""
    import triton

    src, target = kernel_report.compiler_input(comp, arch)
    kernel = triton.compile(src, target=target, options=dict(comp["options"]))
    usage, sass = kernel_report.cubin_usage_and_sass(kernel)
    num_warps = int(kernel.metadata.num_warps)
    shared = int(kernel.metadata.shared or 0) + usage["static_shared"]
    return {
        "sass": sass,
        "ptx": kernel.asm["ptx"],
        "name": kernel.metadata.name,
        "num_warps": num_warps,
        "registers": usage["registers"],
        "shared": shared,
        **kernel_report.occupancy(arch, usage["registers"], num_warps, shared),
    }


# ---------------------------------------------------------------------------------------------
# the model of one launch, one case


@dataclass
class LaunchModel:
    kernel: str
    variant: str
    mode: str
    programs: int
    warps: int
    warps_per_sm: int
    modelled: bool
    note: str = ""
    tree: str = ""  # the SASS loop tree, loops named by the rule when matched
    warp_instrs: float = 0.0  # whole launch
    mma: float = 0.0
    opcodes: dict[str, float] = field(default_factory=dict)  # whole launch, warp instructions by opcode
    issue_s: float = 0.0
    tensor_s: float = 0.0
    memory_s: float = 0.0

    @property
    def bound_s(self) -> float:
        return max(self.issue_s, self.tensor_s, self.memory_s)

    @property
    def bound(self) -> str:
        return max(("issue", self.issue_s), ("tensor", self.tensor_s), ("memory", self.memory_s), key=lambda p: p[1])[0]


def _variant(launch) -> str:
    """The launch's flags (bool constexprs but the interpreter-only DOT_F32, and PHASE)."""
    flags = {
        k: v for k, v in _consts(launch).items()
        if isinstance(v, bool) and k != "DOT_F32" and k not in kernel_report._CONSTEXPR_OPTIONS or k == "PHASE"
    }
    return ",".join(f"{k}={int(v)}" for k, v in sorted(flags.items()))


def model_launch(launch, info: dict, bandwidth: float, mode: str) -> LaunchModel:
    """The bounds of one launch from its compilation (``compile_sass``)."""
    programs = math.prod(launch.grid)
    out = LaunchModel(
        launch.kernel, _variant(launch), mode, programs, info["num_warps"], info["warps_per_sm"], modelled=False
    )
    rule = RULES.get(launch.kernel)
    if rule is None:
        out.note = "no rule for this kernel"
        return out
    res = rule(launch)
    try:
        program = analyse(parse_sass(info["sass"], info["name"]))
        why = match_rule(program, ptx_loops(info["ptx"]), res.shape)
    except LoopShapeError as e:
        out.note = str(e)
        return out
    out.tree = tree_text(program.roots)
    if why:
        out.note = why
        return out
    assert sum(n for n, _ in res.programs) == programs, (launch.kernel, res.programs, launch.grid)
    total: Counter = Counter()
    for n, trips in res.programs:
        for k, x in program.count(trips).items():
            total[k] += n * x
    warps = info["num_warps"]
    out.modelled = True
    out.warp_instrs = total["total"] * warps
    out.mma = total["mma"] * warps
    out.opcodes = {k[len(OPCODE):]: n * warps for k, n in total.items() if k.startswith(OPCODE) and n}
    waves = math.ceil(programs / SMS) / (programs / SMS)
    out.issue_s = out.warp_instrs / (SMS * SCHEDULERS * CLOCK_HZ) * waves
    out.tensor_s = total["mma_cycles"] * warps / (SMS * SCHEDULERS * CLOCK_HZ)
    out.memory_s = dram_bytes(res, min(programs, SMS * info["warps_per_sm"] // warps)) / bandwidth
    return out


def dram_bytes(res: RuleResult, resident: int) -> float:
    """The bytes a launch moves to and from DRAM at least with ``resident`` programs at once: what
    its programs write and soon read back or overwrite stays in L2 while their in-flight share
    fits in half of it (``L2_BYTES``), else crosses DRAM every time."""
    fits = resident * res.in_flight_per_program <= L2_BYTES / 2
    return res.bytes + (0 if fits else res.bytes_beyond_l2)


def _mode_of(launch) -> str:
    """A backward kernel, or a pass shared by both directions launched for the backward (GRAD)."""
    return "backward" if "_bwd_" in launch.kernel or launch.kwargs.get("GRAD") is True else "forward"


def first_training_step(launches: list) -> list[tuple[str, object]]:
    """``(mode, launch)`` for the first forward run of launches and the backward run after it: the
    spec cases run grad_through_routing=True first (then False, which the bench does not time)."""
    out, seen_bwd = [], False
    for lc in launches:
        mode = _mode_of(lc)
        if mode == "forward" and seen_bwd:
            break
        seen_bwd |= mode == "backward"
        out.append((mode, lc))
    return out


_LABEL_RE = re.compile(r"^(\S+) (\d+(?:x\d+)+)(?: B=(\d+))?(?: R=(\d+))? (float32|float16|bfloat16)(?: (\w+))?")


def parse_label(label: str) -> dict:
    """The op, sizes, batch and dtype of a kernel case label (a squash case has no batch: its
    leading dimension stands for it)."""
    m = _LABEL_RE.match(label)
    if m is None:
        raise ValueError(f"cannot read the case label {label!r}")
    kind, shape, batch, iterations, dtype, precision = m.groups()
    dims = [int(x) for x in shape.split("x")]
    batch = batch or dims[0]
    names = ("n_in", "n_out", "d", "d_in")
    sizes = dict(zip(names, dims, strict=False))
    sizes.update(iterations=int(iterations or 3), grad_through_routing=True)
    op = {"layer": "layer", "routing": "routing", "attention-layer": "attention"}.get(kind)
    if op == "attention" and all(
        sizes[k] == v for k, v in kernel_report.bench_registry().specs()["fccaps"].fixed_sizes.items()
    ):
        op = "fccaps"  # Efficient-CapsNet's MNIST layer: its own bench op
    implementation = {"layer": "fused", "routing": "triton", "attention": "triton", "fccaps": "triton"}.get(op)
    return {
        "kind": kind,
        "op": op,
        "implementation": implementation,
        "sizes": sizes,
        "batch": int(batch),
        "dtype": dtype,
        "precision": precision,
    }


def op_memory_bound(meta: dict, mode: str, bandwidth: float) -> float | None:
    """The op's analytic minimum bytes (the spec's ``min_bytes_per_example``) over the bandwidth."""
    if meta["op"] is None:
        return None
    import torch

    spec = kernel_report.bench_registry().specs()[meta["op"]]
    per_example = spec.min_bytes_per_example(meta["sizes"], getattr(torch, meta["dtype"]), mode, meta["batch"])
    return per_example * meta["batch"] / bandwidth


def model_cases(labels: list[str], bandwidth: float, jobs: int = 1, log=print) -> dict:
    """Record, compile and model every launch of the cases: {label: {"meta", "launches"}}."""
    cases = [c for c in kernel_report.shape_sets()["all"] if c.label in labels]
    missing = sorted(set(labels) - {c.label for c in cases})
    if missing:
        raise ValueError(f"unknown cases {missing}")
    kernels = kernel_report._kernels()
    backend = kernel_report.backend_cls()
    per_case = {c.label: first_training_step(kernel_report.record_launches([c])) for c in cases}
    comps: dict[str, dict] = {}
    launch_keys: dict[int, str] = {}  # id of each recorded launch -> its compilation's key
    for steps in per_case.values():
        for _, lc in steps:
            comp = kernel_report.compilation_of(lc, kernels, backend)
            launch_keys[id(lc)] = kernel_report._key(comp)
            comps.setdefault(launch_keys[id(lc)], comp)
    t0 = time.perf_counter()
    keys = list(comps)
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            infos = list(pool.map(compile_sass, [comps[k] for k in keys]))
    else:
        infos = [compile_sass(comps[k]) for k in keys]
    compiled = dict(zip(keys, infos, strict=True))
    log(f"compiled {len(keys)} configurations for sm_90 in {time.perf_counter() - t0:.1f} s")
    out = {}
    for label, steps in per_case.items():
        rows = []
        for mode, lc in steps:
            info = compiled[launch_keys[id(lc)]]
            rows.append(model_launch(lc, info, bandwidth, mode))
        out[label] = {"meta": parse_label(label), "launches": rows}
    return out


# ---------------------------------------------------------------------------------------------
# the ops: raw and calibrated time per mode


def mode_launches(rows: list[LaunchModel], mode: str) -> list[LaunchModel]:
    return [r for r in rows if mode == "forward+backward" or r.mode == "forward"]


def op_time(case: dict, mode: str, bandwidth: float) -> dict:
    """The raw model time of one mode of a case (None when a launch is not modelled)."""
    rows = mode_launches(case["launches"], mode)
    missing = sorted({r.kernel for r in rows if not r.modelled})
    launches_s = sum(r.bound_s for r in rows)
    op_mem = op_memory_bound(case["meta"], mode, bandwidth)
    raw = None if missing else max(launches_s, op_mem or 0.0)
    return {
        "launches_s": None if missing else launches_s,
        "issue_s": sum(r.issue_s for r in rows),
        "op_memory_s": op_mem,
        "raw_s": raw,
        "not_modelled": missing,
    }


def load_measurements(path: str = RESULTS) -> dict:
    with open(path) as f:
        return json.load(f)


def measured(doc: dict, op: str, implementation: str, mode: str, dtype: str, batch: int) -> float | None:
    for r in doc["results"]:
        if (r["op"], r["implementation"], r["mode"], r["dtype"], r["batch_size"]) == (
            op,
            implementation,
            mode,
            dtype,
            batch,
        ) and r.get("examples_per_s"):
            return r["examples_per_s"]
    return None


def calibrate(case: dict, doc: dict, bandwidth: float) -> dict:
    """Efficiency = raw model time / measured time of the routing op, per mode; the factor used is
    their geometric mean (the modes whose launches are all modelled)."""
    meta = case["meta"]
    fits = {}
    for mode in MODES:
        t = op_time(case, mode, bandwidth)
        rate = measured(doc, "routing", "triton", mode, meta["dtype"], meta["batch"])
        if t["raw_s"] is None or rate is None:
            continue
        measured_s = meta["batch"] / rate
        fits[mode] = {
            "raw_s": t["raw_s"],
            "measured_s": measured_s,
            "measured_examples_per_s": rate,
            "efficiency": t["raw_s"] / measured_s,
        }
    if not fits:
        raise RuntimeError("no mode of the calibration case could be modelled")
    factor = math.exp(sum(math.log(f["efficiency"]) for f in fits.values()) / len(fits))
    spread = [min(f["efficiency"] for f in fits.values()), max(f["efficiency"] for f in fits.values())]
    return {"case": CALIBRATION_CASE, "measured_at": MEASURED_AT, "modes": fits, "efficiency": factor, "spread": spread}


def _sizes_measured(meta: dict, doc: dict) -> bool:
    """The committed sweep timed one layer size (its environment's config): a case of other sizes
    has no measurement to compare with."""
    config = doc["environment"]["config"]
    return all(config.get(k) == v for k, v in meta["sizes"].items())


def targets_for(meta: dict, mode: str, doc: dict) -> list[dict]:
    """The spec's targets for this op, mode, implementation and dtype, as examples/s thresholds
    where a measurement of the baseline (eager, torch.compile) on the H200 makes one; only for
    the sizes the sweep timed (the DigitCaps layer) at B = 1024, where the targets are judged."""
    if meta["op"] is None or meta["batch"] != TARGET_BATCH or not _sizes_measured(meta, doc):
        return []
    spec = kernel_report.bench_registry().specs()[meta["op"]]
    out = []
    for t in spec.targets:
        if (t.mode, t.implementation, t.dtype) != (mode, meta["implementation"], meta["dtype"]):
            continue
        if t.quantity == "examples_per_s":
            out.append({"what": f">= {t.threshold:,.0f} examples/s", "examples_per_s": t.threshold, "source": t.source})
        elif t.quantity.startswith("speedup_vs_"):
            base = t.quantity.removeprefix("speedup_vs_")
            rate = measured(doc, meta["op"], base, mode, meta["dtype"], meta["batch"])
            need = rate * t.threshold if rate else None
            what = f">= {t.threshold:g}x {base}"
            what += (
                f" = {need:,.0f} examples/s ({base} {rate:,.0f} on the H200)"
                if rate
                else f" ({base} not measured on a GPU at this size, batch and dtype)"
            )
            out.append({"what": what, "examples_per_s": need, "source": t.source})
    return out


# ---------------------------------------------------------------------------------------------
# output


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def case_table(label: str, case: dict) -> str:
    batch = case["meta"]["batch"]
    head = [
        "mode",
        "kernel",
        "variant",
        "launches",
        "programs",
        "warps",
        "warps/SM",
        "warp-instr/example",
        "MMA/example",
        "issue us",
        "tensor us",
        "memory us",
        "bound",
    ]
    groups: dict[tuple, list[LaunchModel]] = {}
    for r in case["launches"]:
        groups.setdefault((r.mode, r.kernel, r.variant, r.programs, r.warps), []).append(r)
    lines, notes = [], []
    for (mode, kernel, variant, programs, warps), rs in groups.items():
        r0 = rs[0]
        notes.append(None if all(r.modelled for r in rs) else r0.note)
        if notes[-1]:
            cells = ["not modelled", "-", "-", "-", "-", "-"]
        else:
            issue, tensor, memory = (sum(getattr(r, a) for r in rs) for a in ("issue_s", "tensor_s", "memory_s"))
            bound = max(("issue", issue), ("tensor", tensor), ("memory", memory), key=lambda p: p[1])[0]
            cells = [
                f"{sum(r.warp_instrs for r in rs) / batch:,.0f}",
                f"{sum(r.mma for r in rs) / batch:,.0f}",
                _us(issue),
                _us(tensor),
                _us(memory),
                bound,
            ]
        lines.append(
            [
                mode,
                kernel_report._short(kernel),
                variant or "-",
                str(len(rs)),
                str(programs),
                str(warps),
                str(r0.warps_per_sm),
                *cells,
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = [f"-- {label}", "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for line, note in zip(lines, notes, strict=True):
        out.append("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
        if note:
            out.append(f"    not modelled: {note}")
    trees: dict[str, str] = {}
    for r in case["launches"]:
        trees.setdefault(f"{kernel_report._short(r.kernel)} {r.variant}".rstrip(), r.tree or "[]")
    out.append("SASS loop trees (loop/U: unrolled by ptxas, U source iterations a trip; loop%U: the remainder loop):")
    out += [f"    {name}: {tree}" for name, tree in trees.items()]
    return "\n".join(out)


def opcode_text(case: dict, top: int) -> str:
    """Per group of launches (as ``case_table`` groups them) the ``top`` opcodes by dynamic warp
    instructions an example, with their share of the group's instructions."""
    batch = case["meta"]["batch"]
    groups: dict[tuple, Counter] = {}
    for r in case["launches"]:
        if r.modelled:
            key = (r.mode, kernel_report._short(r.kernel), r.variant or "-")
            groups.setdefault(key, Counter()).update(r.opcodes)
    out = [f"warp instructions an example by opcode (the {top} largest):"]
    for (mode, kernel, variant), counts in groups.items():
        total = sum(counts.values())
        cells = [f"{op} {n / batch:,.0f} ({n / total:.0%})" for op, n in counts.most_common(top)]
        out.append(f"    {mode} {kernel} {variant}: {total / batch:,.0f}: " + ", ".join(cells))
    return "\n".join(out)


def summarise(models: dict, calibration: dict, doc: dict, bandwidth: float) -> list[dict]:
    """Per case and mode: raw and predicted time and examples/s, the targets."""
    eff = calibration["efficiency"]
    rows = []
    for label, case in models.items():
        meta = case["meta"]
        for mode in MODES:
            t = op_time(case, mode, bandwidth)
            row = {
                "case": label,
                "op": meta["op"],
                "implementation": meta["implementation"],
                "mode": mode,
                "dtype": meta["dtype"],
                "batch": meta["batch"],
                **t,
            }
            if t["raw_s"] is None:
                row.update(raw_examples_per_s=None, predicted_s=None, predicted_examples_per_s=None)
            else:
                row["raw_examples_per_s"] = meta["batch"] / t["raw_s"]
                row["predicted_s"] = t["raw_s"] / eff
                row["predicted_examples_per_s"] = meta["batch"] / row["predicted_s"]
                # with the lowest and highest of the per-mode fits instead of their mean
                row["predicted_examples_per_s_range"] = [meta["batch"] * e / t["raw_s"] for e in calibration["spread"]]
            heaviest = max(mode_launches(case["launches"], mode), key=lambda r: r.bound_s)
            row["heaviest"] = {
                "kernel": heaviest.kernel,
                "variant": heaviest.variant,
                "bound": heaviest.bound if heaviest.modelled else None,
                "bound_s": heaviest.bound_s,
                "warps_per_sm": heaviest.warps_per_sm,
            }
            row["targets"] = targets_for(meta, mode, doc)
            for target in row["targets"]:
                need, got = target["examples_per_s"], row["predicted_examples_per_s"]
                target["met"] = None if need is None or got is None else got >= need
            rows.append(row)
    return rows


def summary_text(rows: list[dict]) -> str:
    out = []
    for r in rows:
        head = f"{r['case']} [{r['op'] or '-'} {r['implementation'] or ''}] {r['mode']}:"
        if r["raw_s"] is None:
            out.append(f"{head} not modelled ({', '.join(r['not_modelled'])})")
            continue
        mem = f", op memory bound {_us(r['op_memory_s'])} us" if r["op_memory_s"] is not None else ""
        out.append(
            f"{head} launches {_us(r['launches_s'])} us{mem}; raw {r['raw_examples_per_s']:,.0f} examples/s, "
            f"predicted {_us(r['predicted_s'])} us = {r['predicted_examples_per_s']:,.0f} examples/s "
            "({:,.0f} to {:,.0f} with either mode's fit)".format(*r["predicted_examples_per_s_range"])
        )
        h = r["heaviest"]
        out.append(
            f"    heaviest launch: {kernel_report._short(h['kernel'])} {h['variant']} ({h['bound']} bound, "
            f"{_us(h['bound_s'])} us), {h['warps_per_sm']} resident warps per SM ({h['warps_per_sm'] / SCHEDULERS:g} "
            "per scheduler)"
        )
        for t in r["targets"]:
            verdict = {True: "met", False: "NOT met", None: "no threshold"}[t["met"]]
            out.append(f"    target {t['what']} ({t['source']}): {verdict}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(DEFAULT_CASES),
        metavar="LABEL_PREFIX",
        help="kernel cases whose label starts with one of these (default: the DigitCaps-sized ones)",
    )
    harness = kernel_report.bench_harness()
    parser.add_argument("--out", type=harness.output_folder, default=None, help="folder for issue_model.json")
    parser.add_argument("--jobs", type=harness.positive_int, default=1, help="compiler processes (default 1)")
    parser.add_argument(
        "--opcodes", type=harness.nonnegative_int, default=0, metavar="N",
        help="also list each kernel's N most frequent SASS opcodes an example (default 0: none)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: run the model in a process without it")
    t_start = time.perf_counter()
    labels = [c.label for c in kernel_report.shape_sets()["all"]]
    chosen = [lb for lb in labels if any(lb.startswith(p) for p in args.cases)]
    if "" in args.cases:
        parser.error("argument --cases: an empty prefix would take every case; name the ones to model")
    unmatched = [p for p in args.cases if not any(lb.startswith(p) for lb in labels)]
    if unmatched:
        parser.error(f"no kernel case label starts with {unmatched}")
    if CALIBRATION_CASE not in chosen:
        chosen.insert(0, CALIBRATION_CASE)  # always: it fits the efficiency factor
    doc = load_measurements()
    bandwidth = doc["environment"]["copy_bandwidth_bytes_per_s"]
    models = model_cases(chosen, bandwidth, args.jobs)
    calibration = calibrate(models[CALIBRATION_CASE], doc, bandwidth)
    rows = summarise(models, calibration, doc, bandwidth)

    print(
        f"\nH200 model: {SMS} SMs x {SCHEDULERS} schedulers at {CLOCK_HZ / 1e9:.2f} GHz, copy bandwidth "
        f"{bandwidth / 1e12:.3f} TB/s (results.json); bounds summed over launches, microseconds\n"
    )
    for label, case in models.items():
        print(case_table(label, case) + "\n")
        if args.opcodes > 0:
            print(opcode_text(case, args.opcodes) + "\n")
    print(f"Calibration on {CALIBRATION_CASE} (triton), measured at {MEASURED_AT} (the kernels changed since):")
    for mode, f in calibration["modes"].items():
        print(
            f"  {mode}: raw model {_us(f['raw_s'])} us, measured {_us(f['measured_s'])} us "
            f"({f['measured_examples_per_s']:,.0f} examples/s): raw / measured = {f['efficiency']:.3f}"
        )
    print(f"  efficiency factor used (geometric mean): {calibration['efficiency']:.3f}\n")
    print(summary_text(rows))
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = {
            "machine": {
                "name": "NVIDIA H200 SXM",
                "sms": SMS,
                "schedulers_per_sm": SCHEDULERS,
                "clock_hz": CLOCK_HZ,
                "copy_bandwidth_bytes_per_s": bandwidth,
                "mma_fma_per_cycle_per_subpartition": {f"{k[0]} {k[1]}": v for k, v in MMA_RATE.items()},
            },
            "calibration": calibration,
            "cases": {
                label: {
                    "meta": case["meta"],
                    "launches": [
                        {**r.__dict__, "bound": r.bound if r.modelled else None, "bound_s": r.bound_s}
                        for r in case["launches"]
                    ],
                }
                for label, case in models.items()
            },
            "predictions": rows,
        }
        path = os.path.join(args.out, "issue_model.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
