"""Offline kernel report: compile every capstriton kernel for an NVIDIA target without a GPU.

For the representative shapes the bench specs declare (``kernel_cases`` in ``bench/specs/``)
this script records the kernel launches the library really makes (it runs the ``capstriton.ops``
operators on fake CUDA tensors under ``capstriton.ops._launch.recording``, so the kernels,
arguments, constexprs and ``num_warps`` are exactly what the op modules pass), specialises the
integer and pointer arguments as a real launch would (ints
equal to 1 become constexprs, multiples of 16 and fresh allocations get ``tt.divisibility=16``),
compiles each distinct compilation once with ``triton.compile`` for the target, and reads the
cubin with the tools shipped in the triton package (``ptxas -v``, ``cuobjdump``):

    registers per thread, spill stores/loads, stack, shared memory, theoretical occupancy
    (resident warps per SM from registers, shared memory and the warp/block limits), and SASS
    instruction counts (FFMA, MMA, MUFU, global loads/stores by width, local memory).

A table goes to stdout, and with ``--out`` to ``<arch>.txt`` beside ``<arch>.json``. Nothing
launches a kernel and ``triton.runtime.driver`` is never touched, so it runs on a machine
without a GPU (and without ``TRITON_INTERPRET``: run as a script it removes the variable
before triton is imported).

    python bench/kernel_report.py                      # sm_90, every shape set
    python bench/kernel_report.py --arch sm_90 sm_80 --out bench/results/kernel_report
    python bench/kernel_report.py --shapes digitcaps --fail-on-spill
    python bench/kernel_report.py --specs layer         # only the fused layer's cases
    python bench/kernel_report.py --reuse bench/results/kernel_report/sm_90.json  # compile what changed

``--reuse`` takes a configuration's results from earlier reports where triton's own cache key of
the compilation (``compile_key``, stored in each entry) is found there: the same compilation, so
the same registers, spills and SASS; only from reports of the same ``report_key`` (this script's
own analysis: occupancy rule, limits, SASS counts); every other configuration is compiled.

Numbers are per compiled kernel; see README.md, section "Kernel report", for how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

if __name__ == "__main__":
    # must precede the first import of triton; a process that imports this module (a test) keeps
    # its own setting, and main() refuses to run under the interpreter
    os.environ.pop("TRITON_INTERPRET", None)
    # A private, empty cache: every kernel is compiled, so the registers and spills are read from
    # the log of the ptxas run triton itself made, with its options (triton 3.9 passes
    # --regAllocOptLevel=2, which changes the allocation).
    _CACHE = tempfile.TemporaryDirectory(prefix="capstriton-kernel-report-")
    os.environ["TRITON_CACHE_DIR"] = _CACHE.name

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# ---------------------------------------------------------------------------------------------
# targets

#: Per-SM limits used for the theoretical occupancy (CUDA C Programming Guide, table of compute
#: capabilities). ``smem_per_sm`` is the shared memory an SM can give to resident blocks;
#: every block also costs ``smem_reserved`` bytes reserved by the runtime.
ARCHS = {
    "sm_90": {
        "capability": 90,
        "regs_per_sm": 65536,
        "max_warps_per_sm": 64,
        "max_blocks_per_sm": 32,
        "reg_alloc_unit": 256,  # registers, per warp
        "max_regs_per_thread": 255,
        "smem_per_sm": 228 * 1024,
        "smem_reserved": 1024,
    },
    "sm_80": {
        "capability": 80,
        "regs_per_sm": 65536,
        "max_warps_per_sm": 64,
        "max_blocks_per_sm": 32,
        "reg_alloc_unit": 256,
        "max_regs_per_thread": 255,
        "smem_per_sm": 164 * 1024,
        "smem_reserved": 1024,
    },
}

# ---------------------------------------------------------------------------------------------
# shapes: what the library is asked to run, as the bench specs declare it (KernelCase)


def bench_harness():
    """bench/harness.py, imported from this folder (issue_model.py takes it from here too)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness

    return harness


def bench_registry():
    """bench/registry.py, the specs of every op the benches know, with capstriton importable."""
    harness = bench_harness()
    harness.ensure_capstriton()
    return harness.import_registry()


def spec_names() -> list[str]:
    """The specs that declare kernel cases (``--specs`` chooses among them)."""
    return sorted(name for name, spec in bench_registry().specs().items() if spec.kernel_cases)


def shape_sets(specs=None) -> dict[str, list]:
    """Named sets of cases from the ``kernel_cases`` of every spec (or of those named in ``specs``):
    ``digitcaps`` is the paper's layer, ``odd`` stresses the masks and the block heuristics with
    sizes that are not powers of two."""
    specs = spec_names() if specs is None else specs
    chosen = [spec for name, spec in bench_registry().specs().items() if spec.kernel_cases and name in specs]
    cases = [_own_config(case, spec.config_keys) for spec in chosen for case in spec.kernel_cases()]
    sets = {name: [c for c in cases if c.shape_set == name] for name in sorted({c.shape_set for c in cases})}
    return {**sets, "all": cases}


def _own_config(case, keys: tuple[str, ...]):
    """``case`` running with the ``--config`` overrides its spec takes (``keys``) and no others:
    each op has its own launch knobs."""
    run = case.run
    return dataclasses.replace(case, run=lambda config: run({k: v for k, v in config.items() if k in keys}))


# ---------------------------------------------------------------------------------------------
# recording the launches of capstriton.ops


@dataclass
class Launch:
    case: str
    kernel: str
    grid: tuple
    kwargs: dict  # argument name -> ("tensor", dtype) / ("int", value) / ... or a plain constant


_TORCH_TO_TRITON = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
_CONSTEXPR_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
#: The launch options a kernel launched through ``wrap_triton`` keeps under torch.compile (torch
#: 2.13: dynamo moves num_warps, num_stages and num_ctas into the kernel's config, of which
#: inductor's ``config_to_dict`` keeps these two; the others are dropped)
COMPILED_OPTIONS = ("num_warps", "num_stages")


def record_launches(cases, config: dict | None = None) -> list[Launch]:
    """Run each case's ops on fake CUDA tensors, recording every launch instead of running it
    (``capstriton.ops._launch.recording``); ``config`` overrides the ops' launch parameters (a
    candidate to check before it becomes a default)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from capstriton.ops._launch import recording

    launches: list[Launch] = []
    label = [""]

    def describe(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", _TORCH_TO_TRITON[str(a.dtype)])
        if isinstance(a, bool):
            return ("bool", a)
        if isinstance(a, int):
            return ("int", int(a))
        if isinstance(a, float):
            return ("float", a)
        raise TypeError(f"unexpected kernel argument {a!r}")

    def record(kernel, grid, kwargs):
        fn = kernel  # a JITFunction: the report never runs under the interpreter
        params = {p.name: p for p in fn.params}
        described = {
            k: (v if k in _CONSTEXPR_OPTIONS or params[k].is_constexpr else describe(v)) for k, v in kwargs.items()
        }
        launches.append(Launch(label[0], fn.__name__, tuple(int(g) for g in grid), described))

    with recording(record), FakeTensorMode(allow_non_fake_inputs=True):
        for case in cases:
            label[0] = case.label
            case.run(dict(config or {}))
    return launches


# ---------------------------------------------------------------------------------------------
# from a launch to a compilation (signature, constexprs, attrs) as triton's launcher builds it


def _kernels() -> dict:
    """Every ``@triton.jit`` kernel (name ending in ``_kernel``) of every capstriton.kernels module."""
    import importlib
    import pkgutil

    import capstriton.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"capstriton.kernels.{info.name}")
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                found[name] = (obj, module)
    return found


def _specialize(backend_cls, value, specialize: bool, align: bool):
    """``(type, key)`` of one argument, as the launcher computes it."""
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # older triton: the same rules, written out
        native_specialize_impl = None
    if native_specialize_impl is not None:
        return native_specialize_impl(backend_cls, value, False, specialize, align)
    if isinstance(value, triton.runtime.jit.MockTensor):
        return "*" + _dtype_name(value.dtype), "D" if align else ""
    if isinstance(value, bool):
        return "u1", None
    if specialize and value == 1:
        return "constexpr", 1
    ty = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
    return ty, ("D" if specialize and align and value % 16 == 0 else "")


def _dtype_name(dtype) -> str:
    return _TORCH_TO_TRITON.get(str(dtype), str(dtype))


def compilation_of(launch: Launch, kernels: dict, backend_cls) -> dict:
    """The key of one compilation: kernel, signature, constexprs, divisibility, options."""
    import torch

    fn, _ = kernels[launch.kernel]
    kwargs = dict(launch.kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4)}
    for opt in _CONSTEXPR_OPTIONS[1:]:
        if opt in kwargs:
            options[opt] = kwargs.pop(opt)
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    signature, constexprs, attrs, specialised = {}, {}, {}, []
    for p in fn.params:
        if p.name in kwargs:
            value = kwargs.pop(p.name)
        elif p.has_default:
            value = p.default if p.is_constexpr else ("const", p.default)
        else:
            raise ValueError(f"{launch.kernel}: the launch gives no {p.name}")
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        kind, v = value
        arg = triton.runtime.jit.MockTensor(torch_dtypes[v]) if kind == "tensor" else v
        ty, key = _specialize(backend_cls, arg, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[p.name] = "constexpr"
            constexprs[p.name] = key
            specialised.append(f"{p.name}=1")
            continue
        signature[p.name] = ty
        if key == "D":
            attrs[p.name] = 16
            if not ty.startswith("*"):
                specialised.append(f"{p.name}%16")
    if kwargs:
        raise ValueError(f"{launch.kernel}: unknown keyword arguments {sorted(kwargs)}")
    return {
        "kernel": launch.kernel,
        "signature": signature,
        "constexprs": constexprs,
        "divisibility": attrs,
        "options": options,
        "specialised": specialised,
    }


def as_compiled(comp: dict) -> dict:
    """The compilation torch.compile makes of the same launch: only the launch options it keeps."""
    return {**comp, "options": {k: v for k, v in comp["options"].items() if k in COMPILED_OPTIONS}}


def _key(comp: dict) -> str:
    return json.dumps(
        [comp["kernel"], comp["signature"], comp["constexprs"], comp["divisibility"], comp["options"]],
        sort_keys=True,
    )


# ---------------------------------------------------------------------------------------------
# compiling and reading the cubin


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):  # a triton that finds its tools elsewhere
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
    return path


_PTXAS_RE = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}


def _parse_ptxas(log: str) -> dict | None:
    out = {}
    for name, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            return None
        out[name] = int(m.group(1))
    return out


def _ptxas(arch: str) -> str:
    """The ptxas triton itself uses for ``arch`` (triton 3.9 compiles sm_90 with the newer
    ``ptxas-blackwell`` and writes PTX the older one rejects; 3.6 to 3.8 only from sm_100)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(ARCHS[arch]["capability"]).path
    except (ImportError, AttributeError):
        return _tool("ptxas")


def _run_ptxas(ptx: str, arch: str) -> dict:
    gpu = f"{arch}a" if arch == "sm_90" else arch  # triton compiles sm_90 as the specific sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [_ptxas(arch), "-v", "-lineinfo", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    return _parse_ptxas(res.stdout + res.stderr)


_INSN_RE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def sass_counts(sass: str) -> dict:
    """Instruction counts that matter for these kernels, from ``cuobjdump -sass`` text."""
    ops = _INSN_RE.findall(sass)
    c = {
        "total": len(ops),
        "FFMA": 0,
        "FMUL": 0,
        "FADD": 0,
        "MMA": 0,
        "MUFU": 0,
        "SHFL": 0,
        "LDS": 0,
        "STS": 0,
        "LDL": 0,
        "STL": 0,
        "BAR": 0,
    }
    for kind in ("LDG", "STG"):
        for width in (128, 64, 32, 16, 8):
            c[f"{kind}.{width}"] = 0
    for op in ops:
        parts = op.split(".")
        base = parts[0]
        if base in ("FFMA", "FMUL", "FADD", "MUFU", "SHFL", "LDS", "STS", "LDL", "STL", "BAR"):
            c[base] += 1
        elif base in ("HMMA", "HGMMA", "IMMA", "WGMMA") or base.endswith("MMA") and base != "HFMA2":
            c["MMA"] += 1
        elif base in ("LDG", "STG"):
            width = 32
            for p in parts[1:]:
                if p in ("128", "64"):
                    width = int(p)
                elif p in ("U16", "S16"):
                    width = 16
                elif p in ("U8", "S8"):
                    width = 8
            c[f"{base}.{width}"] += 1
    return c


def _resource_usage(cubin_path: str) -> dict:
    out = subprocess.run(
        [_tool("cuobjdump"), "--dump-resource-usage", cubin_path], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump --dump-resource-usage output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def occupancy(arch: str, registers: int, num_warps: int, shared_bytes: int) -> dict:
    """Theoretical resident warps per SM and which limit decides it."""
    a = ARCHS[arch]
    unit = a["reg_alloc_unit"]
    regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    limits = {
        "warps": a["max_warps_per_sm"] // num_warps,
        "blocks": a["max_blocks_per_sm"],
        "registers": (a["regs_per_sm"] // regs_per_warp) // num_warps,
        "shared": a["smem_per_sm"] // (shared_bytes + a["smem_reserved"]),
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])  # ties: the first of warps, blocks, registers, shared
    warps = blocks * num_warps
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": warps,
        "occupancy": warps / a["max_warps_per_sm"],
        "limiter": limiter,
    }


_WORKER_STATE: dict = {}


def backend_cls():
    """The NVIDIA compiler backend's class (its specialisation rules for ``compilation_of``)."""
    from triton.compiler.compiler import make_backend

    return type(make_backend(GPUTarget("cuda", 90, 32)))


def process_kernels() -> dict:
    """:func:`_kernels`, loaded once per process (pool workers too)."""
    if "kernels" not in _WORKER_STATE:
        _WORKER_STATE["kernels"] = _kernels()
    return _WORKER_STATE["kernels"]


def compiler_input(comp: dict, arch: str):
    """One configuration's ``triton.compile`` source (the kernel with its signature, constexprs and
    divisibility) and target."""
    fn, _ = process_kernels()[comp["kernel"]]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", d]] for n, d in comp["divisibility"].items()}
    src = triton.compiler.ASTSource(
        fn=fn, signature=dict(comp["signature"]), constexprs=dict(comp["constexprs"]), attrs=attrs
    )
    return src, GPUTarget("cuda", ARCHS[arch]["capability"], 32)


def cubin_usage_and_sass(kernel) -> tuple[dict, str]:
    """Resource usage (``cuobjdump -res-usage``) and the SASS text of a compiled kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = _resource_usage(path)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    return usage, sass


def compile_key(comp: dict, arch: str) -> str | None:
    """Triton's own cache key of one configuration, without compiling it: the sha256 that
    ``triton.compile`` names its cache entry by (and reports as the kernel's ``hash``), of the
    triton installation, the kernel's source with every function it calls, its signature,
    constexprs and divisibility, the target and ptxas, the options and the cache-invalidating
    environment; None where this triton has no ``get_cache_key``."""
    from triton.compiler import compiler as tc

    get_key = getattr(tc, "get_cache_key", None)
    env_vars = getattr(tc, "get_cache_invalidating_env_vars", None)
    if get_key is None or env_vars is None:
        return None
    src, target = compiler_input(comp, arch)
    backend = tc.make_backend(target)
    options = backend.parse_options(dict(dict(comp["options"]), **src.parse_options()))
    return hashlib.sha256(get_key(src, backend, options, env_vars=env_vars()).encode("utf-8")).hexdigest()


#: what ``compile_one`` reads from one compilation (``--reuse`` takes them from a report's entry)
RESULT_FIELDS = (
    "arch", "kernel", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "stack", "local",
    "shared", "dynamic_shared", "static_shared", "blocks_per_sm", "warps_per_sm", "occupancy", "limiter", "sass",
    "compile_s", "compile_key",
)


def report_key() -> str:
    """What this script derives from a compilation beyond triton's cache key, hashed: the
    architectures' limits, the occupancy rule, the parsing of ptxas's log, cuobjdump's resource
    usage and the SASS counts. Stored in each report; ``--reuse`` takes entries only from reports
    with the same key (a changed rule would otherwise keep its old occupancy or counts)."""
    parts = [repr(sorted(ARCHS.items())), *(inspect.getsource(f) for f in _DERIVED)]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def reusable(paths: list[str], arch: str, key: str | None = None) -> dict[str, dict]:
    """The compilations of earlier reports (JSON files of this script) for ``arch`` by their
    ``compile_key``: a configuration with the same key is the same compilation by triton's own
    cache rule, so its registers, spills and SASS are those already read, and with the same
    ``report_key`` so are the figures this script derives from them (``compile_s`` is the time of
    the run that compiled it). Reports of another architecture or script version, and entries
    without every field, are passed over, with a line on stderr."""
    found, key = {}, key or report_key()
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("kernels"), list):
            raise ValueError(f"--reuse {path}: not a kernel report (a JSON object with a 'kernels' list)")
        if doc.get("arch") != arch:
            continue
        if doc.get("report_key") != key:
            print(f"--reuse {path}: written by another version of this script's analysis; not reused",
                  file=sys.stderr)
            continue
        entries = [e for e in doc["kernels"] if isinstance(e, dict) and all(k in e for k in RESULT_FIELDS)]
        if len(entries) < len(doc["kernels"]):
            print(f"--reuse {path}: {len(doc['kernels']) - len(entries)} entries without every field; not reused",
                  file=sys.stderr)
        found.update((e["compile_key"], {k: e[k] for k in RESULT_FIELDS}) for e in entries)
    return found


def compile_one(comp: dict, arch: str) -> dict:
    """Compile one configuration for ``arch`` and read its resources and SASS."""
    t0 = time.perf_counter()
    src, target = compiler_input(comp, arch)
    log = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    nv = getattr(knobs, "nvidia", None) if knobs is not None else None
    ctx = nv.scope() if nv is not None and hasattr(nv, "scope") else contextlib.nullcontext()
    with ctx, contextlib.redirect_stdout(log):
        if nv is not None and hasattr(nv, "dump_ptxas_log"):
            nv.dump_ptxas_log = True  # ptxas -v output of this very compilation, when not cached
        kernel = triton.compile(src, target=target, options=dict(comp["options"]))
    ptxas = _parse_ptxas(log.getvalue())
    if ptxas is None:  # a cache hit (no ptxas run): run ptxas -v on the same PTX
        ptxas = _run_ptxas(kernel.asm["ptx"], arch)
    usage, sass = cubin_usage_and_sass(kernel)
    md = kernel.metadata
    num_warps = int(md.num_warps)
    dynamic_shared = int(md.shared or 0)
    shared = dynamic_shared + usage["static_shared"]
    return {
        "arch": arch,
        "kernel": comp["kernel"],
        "num_warps": num_warps,
        "num_stages": int(md.num_stages),
        "registers": ptxas["registers"],
        "spill_stores": ptxas["spill_stores"],
        "spill_loads": ptxas["spill_loads"],
        "stack": ptxas["stack"],
        "local": usage["local"],
        "shared": shared,
        "dynamic_shared": dynamic_shared,
        "static_shared": usage["static_shared"],
        **occupancy(arch, ptxas["registers"], num_warps, shared),
        "sass": sass_counts(sass),
        "compile_s": round(time.perf_counter() - t0, 3),
        "compile_key": kernel.hash,
    }


# ---------------------------------------------------------------------------------------------
# report


@dataclass
class Row:
    comp: dict
    cases: list = field(default_factory=list)
    result: dict | None = None


def _blocks(comp: dict) -> str:
    c = comp["constexprs"]
    if "BLOCK_I" in c:
        return f"I{c['BLOCK_I']} J{c['BLOCK_J']} D{c['BLOCK_D']}"
    if "BLOCK_R" in c:
        return f"R{c['BLOCK_R']} D{c['BLOCK_D']}"
    if "BLOCK_J" in c:
        return f"J{c['BLOCK_J']} D{c.get('BLOCK_D')}"
    # the fused layer's passes (BLOCK_B, BLOCK_IC, BLOCK_KIN, BLOCK_DK, ...; BLOCK alone): every block
    return " ".join(f"{k.removeprefix('BLOCK').removeprefix('_')}{v}" for k, v in c.items() if k.startswith("BLOCK"))


def _variant(comp: dict) -> str:
    c = comp["constexprs"]
    flags = [f"{k}={int(v)}" for k, v in c.items() if isinstance(v, bool)]
    if c.get("N_OUT"):  # the fused logits pass's output capsules unrolled (logits in registers)
        flags.append(f"N_OUT={c['N_OUT']}")
    return ",".join(flags)


def _dtype(comp: dict) -> str:
    ptrs = [t[1:] for t in comp["signature"].values() if t.startswith("*")]
    narrow = [t for t in ptrs if t != "fp32"]
    return narrow[0] if narrow else "fp32"


def _short(kernel: str) -> str:
    """A table name: ``dynamic_routing_bwd_final_kernel`` -> ``dynamic_routing_bwd_final``."""
    return kernel.removesuffix("_kernel")


def format_table(rows: list[Row]) -> str:
    head = [
        "kernel",
        "variant",
        "dtype",
        "blocks",
        "w",
        "st",
        "regs",
        "spill st/ld",
        "stack",
        "smem",
        "warps/SM",
        "limit",
        "FFMA",
        "MUFU",
        "MMA",
        "LDG 128/64/32/16",
        "STG 128/64/32/16",
        "LDL/STL",
        "ints =1 / %16",
        "cases",
    ]
    lines = []
    for row in rows:
        r, comp = row.result, row.comp
        s = r["sass"]
        lines.append(
            [
                _short(comp["kernel"]),
                _variant(comp),
                _dtype(comp),
                _blocks(comp),
                str(r["num_warps"]),
                str(r["num_stages"]),
                str(r["registers"]),
                f"{r['spill_stores']}/{r['spill_loads']}",
                str(r["stack"]),
                str(r["shared"]),
                f"{r['warps_per_sm']} ({r['occupancy']:.0%})",
                r["limiter"],
                str(s["FFMA"]),
                str(s["MUFU"]),
                str(s["MMA"]),
                "/".join(str(s[f"LDG.{w}"]) for w in (128, 64, 32, 16)),
                "/".join(str(s[f"STG.{w}"]) for w in (128, 64, 32, 16)),
                f"{s['LDL']}/{s['STL']}",
                " ".join(comp["specialised"]) or "-",
                _cases_summary(row.cases),
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def _cases_summary(cases: list[str]) -> str:
    uniq = sorted(set(c.replace(" grad_through=True", "").replace(" grad_through=False", "") for c in cases))
    return "; ".join(uniq[:3]) + (f"; +{len(uniq) - 3} more" if len(uniq) > 3 else "")


def spill_exceptions() -> dict:
    """Deliberate spills, documented beside the kernel: ``SPILL_EXCEPTIONS = {kernel: reason}``
    in its module (none today)."""
    out = {}
    for _, module in _kernels().values():
        out.update(getattr(module, "SPILL_EXCEPTIONS", {}))
    return out


def parse_config(parser: argparse.ArgumentParser, items: list[str], specs: list[str]) -> dict:
    """``KEY=VALUE`` overrides of the launch parameters of the ops of ``specs`` (their
    ``config_keys``; each op gets its own), checked as the tuning classes check their knobs."""
    registry = bench_registry().specs()  # (makes capstriton importable)
    from capstriton.ops._passes import knob_expectation

    keys = sorted({k for name in specs for k in registry[name].config_keys})
    config = {}
    for item in items:
        key, _, text = item.partition("=")
        if key not in keys:
            parser.error(f"argument --config: KEY must be one of {keys} (the launch knobs of --specs "
                         f"{' '.join(specs)}), got {item!r}")
        try:
            value = int(text)
        except ValueError:
            value = None
        expected = knob_expectation(value, key.endswith("warps"))  # (the tuning classes' warps fields)
        if expected is not None:
            parser.error(f"argument --config: {key} must be {expected}, got {text!r}")
        config[key] = value
    return config


#: the functions whose results ``compile_one`` reports beside triton's (``report_key``)
_DERIVED = (occupancy, sass_counts, _parse_ptxas, _resource_usage, cubin_usage_and_sass, compile_one)


def main(argv=None) -> int:
    harness = bench_harness()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["sm_90"])
    parser.add_argument(
        "--out", type=harness.output_folder, default=None, help="folder for <arch>.json (default: no JSON)"
    )
    parser.add_argument("--shapes", choices=sorted(shape_sets()), default="all")
    parser.add_argument(
        "--specs",
        nargs="+",
        choices=spec_names(),
        default=None,
        help="only the cases of these bench specs (default: every spec's), e.g. layer for the fused layer",
    )
    parser.add_argument("--jobs", type=harness.positive_int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument(
        "--fail-on-spill",
        action="store_true",
        help="exit 1 if a configuration spills (bar documented SPILL_EXCEPTIONS)",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override the ops' launch parameters (e.g. tile=4096 num_warps=16 for routing)",
    )
    parser.add_argument(
        "--as-compiled",
        action="store_true",
        help="compile as torch.compile launches the kernels: with the launch options torch's "
        "user-defined Triton kernel path keeps (num_warps, num_stages) and without the others "
        "(maxnreg, enable_fp_fusion), which it drops",
    )
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="JSON",
        help="take the results of a configuration from these earlier reports (<arch>.json) where "
        "its compile key (triton's cache key: same triton, kernel source, arguments, target and "
        "options) is found there, instead of compiling it again",
    )
    args = parser.parse_args(argv)
    config = parse_config(parser, args.config, args.specs or spec_names())
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: run the report in a process without it")

    t_start = time.perf_counter()
    # the script version's key, read now: its source may change on disk while the compilations run
    # (inspect reads a function's lines from the file as it is then)
    analysis_key = report_key()
    cases = shape_sets(args.specs)[args.shapes]
    launches = record_launches(cases, config)
    kernels = _kernels()
    backend = backend_cls()
    rows: dict[str, Row] = {}
    for launch in launches:
        comp = compilation_of(launch, kernels, backend)
        if args.as_compiled:
            comp = as_compiled(comp)
        row = rows.setdefault(_key(comp), Row(comp))
        row.cases.append(launch.case)
    missing = sorted(set(kernels) - {r.comp["kernel"] for r in rows.values()})
    if missing and args.specs is None:
        print(f"warning: kernels never launched by these shapes: {missing}", file=sys.stderr)

    order = list(rows.values())
    status = 0
    exceptions = spill_exceptions()
    for arch in dict.fromkeys(args.arch):  # each once (the same file otherwise)
        t_arch = time.perf_counter()
        known = reusable(args.reuse, arch, analysis_key) if args.reuse else {}
        keys = [compile_key(row.comp, arch) if known else None for row in order]
        jobs = [(row.comp, arch) for row, key in zip(order, keys, strict=True) if key not in known]
        if args.jobs > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
                compiled = iter(list(pool.map(compile_one, *zip(*jobs, strict=True))))
        else:
            compiled = iter([compile_one(c, a) for c, a in jobs])
        results = [known[key] if key in known else next(compiled) for key in keys]
        arch_rows = [Row(row.comp, row.cases, res) for row, res in zip(order, results, strict=True)]
        arch_rows.sort(key=lambda r: (r.comp["kernel"], _dtype(r.comp), _blocks(r.comp), _variant(r.comp)))
        elapsed = time.perf_counter() - t_arch
        reused = f", {len(order) - len(jobs)} of them reused (--reuse)" if args.reuse else ""
        print(
            f"\n== {arch}: {len(arch_rows)} distinct compilations from {len(launches)} launches "
            f"of {len(cases)} cases{reused} ({elapsed:.1f} s) =="
        )
        print(format_table(arch_rows))
        spills = [r for r in arch_rows if r.result["spill_stores"] or r.result["spill_loads"]]
        bad = [r for r in spills if r.comp["kernel"] not in exceptions]
        if spills:
            print(f"\n{len(spills)} configuration(s) spill on {arch}:")
            for r in spills:
                note = exceptions.get(r.comp["kernel"], "NOT DOCUMENTED")
                print(
                    f"  {r.comp['kernel']} {_blocks(r.comp)} {_dtype(r.comp)}: "
                    f"{r.result['spill_stores']}/{r.result['spill_loads']} bytes ({note})"
                )
        if bad and args.fail_on_spill:
            status = 1
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            doc = {
                "arch": arch,
                "report_key": analysis_key,  # --reuse: the script version that derived the figures
                "limits": ARCHS[arch],
                "versions": {"triton": triton.__version__, "python": platform.python_version()},
                "config": config,  # launch parameter overrides (--config); {} for the defaults
                "as_compiled": args.as_compiled,
                "shapes": args.shapes,
                "specs": args.specs or spec_names(),
                "cases": [c.label for c in cases],
                "launches": len(launches),
                "elapsed_s": round(elapsed, 1),
                "kernels": [
                    {
                        **r.result,
                        "dtype": _dtype(r.comp),
                        "blocks": {k: v for k, v in r.comp["constexprs"].items() if k.startswith("BLOCK_")},
                        "constexprs": r.comp["constexprs"],
                        "signature": r.comp["signature"],
                        "divisibility": r.comp["divisibility"],
                        "specialised": r.comp["specialised"],
                        "cases": sorted(set(r.cases)),
                    }
                    for r in arch_rows
                ],
            }
            with open(os.path.join(args.out, f"{arch}.txt"), "w") as f:
                f.write(format_table(arch_rows) + "\n")
            path = os.path.join(args.out, f"{arch}.json")
            with open(path, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            print(f"wrote {path}")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
