"""What every benchmark driver shares: importing capstriton from a checkout, timing, peak memory,
bandwidth, the environment record and JSON output. Imported by the drivers in ``bench/``."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def ensure_capstriton() -> None:
    """Make ``import capstriton`` (and ``capstriton.kernels``) work from a plain checkout that was
    never installed: the kernels live in the top-level ``kernels/`` folder, which only the
    installed package maps to ``capstriton.kernels``."""
    if importlib.util.find_spec("capstriton") is None:
        sys.path.insert(0, str(REPO))
    if importlib.util.find_spec("capstriton.kernels") is None:
        init = REPO / "kernels" / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            "capstriton.kernels", init, submodule_search_locations=[str(init.parent)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["capstriton.kernels"] = module
        spec.loader.exec_module(module)
        import capstriton

        capstriton.kernels = module  # as the import system sets a loaded submodule on its package


def import_registry():
    """The registry module with ``bench/`` on the path (its specs import as ``specs.<name>``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import registry

    return registry


# --------------------------------------------------------------------------------------------
# command line


SIZE_OPTIONS = ("n_in", "n_out", "d_in", "d", "iterations")

# ---------------------------------------------------------------------------------------------
# argparse types of the drivers' options: a bad value is a one-line usage error naming the option


def output_folder(text: str) -> Path:
    """A folder the driver writes into (created when missing): refused when it, or a folder above
    it, exists as something else than a folder."""
    path = Path(text)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r} cannot be a folder: {str(p)!r} exists and is not one")
            break
    return path


def _number(text: str, kind, noun: str, ok, expected: str):
    """``text`` converted by ``kind`` (int, float), accepted when ``ok(value)``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, "an integer", lambda v: v >= 1, ">= 1")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, "an integer", lambda v: v >= 0, ">= 0")


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def add_size_options(parser) -> None:
    """The layer and routing sizes every driver takes (the paper's DigitCaps by default)."""
    parser.add_argument("--n-in", type=int, default=1152, help="input capsules N_in (default: %(default)s)")
    parser.add_argument("--n-out", type=int, default=10, help="output capsules N_out (default: %(default)s)")
    parser.add_argument("--d-in", type=int, default=8, help="input capsule dimension D_in (default: %(default)s)")
    parser.add_argument("--d", type=int, default=16, help="output capsule dimension D (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=3, help="routing iterations (default: %(default)s)")
    parser.add_argument("--no-grad-through-routing", action="store_true", help="grad_through_routing=False")


def sizes_of(parser, args) -> dict:
    """The sizes dict of the specs from :func:`add_size_options`' arguments (each at least 1)."""
    for name in SIZE_OPTIONS:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return {name: getattr(args, name) for name in SIZE_OPTIONS} | {
        "grad_through_routing": not args.no_grad_through_routing
    }


# --------------------------------------------------------------------------------------------
# timing and memory


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_step(step, device, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) of one call's time in ms, warm-up excluded: on CUDA
    ``triton.testing.do_bench`` (CUDA events per call), on a CPU ``torch.utils.benchmark``'s
    ``blocked_autorange`` with all intra-op threads (quantiles over blocks)."""
    import torch

    if device.type == "cuda":
        import triton.testing

        warmup, rep = (5, 20) if quick else (25, 100)
        med, p20, p80 = triton.testing.do_bench(step, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.05 if quick else 0.3)
    times = sorted(m.times)
    return 1e3 * m.median, 1e3 * quantile(times, 0.2), 1e3 * quantile(times, 0.8)


TIMING_NOTE = {
    "cuda": "triton.testing.do_bench, CUDA events per call, median and 20/80% quantiles",
    "cpu": "torch.utils.benchmark.Timer.blocked_autorange, median and 20/80% quantiles over blocks",
}
MEMORY_NOTE = {
    "cuda": "torch.cuda.max_memory_allocated during one call minus memory allocated before it",
    "cpu": "not measured: PyTorch's CPU allocator keeps no peak statistics",
}


def peak_memory(step, device) -> int | None:
    """Peak bytes allocated by one call beyond what was allocated before it (CUDA only)."""
    import torch

    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def saved_tensor_bytes(step) -> int:
    """Bytes of the tensors autograd saves for backward during ``step()`` (one forward), counted
    exactly with ``torch.autograd.graph.saved_tensors_hooks`` on any device: each distinct
    storage once (a view of a saved tensor, or a parameter saved by two ops, costs nothing more).
    Parameters and inputs are counted too: they are what a training step keeps alive."""
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(storages.values())


def peak_tensor_bytes(step) -> int:
    """Peak bytes of the tensors ``step()`` allocates and holds at once, beyond those alive before
    it (inputs, parameters), counted at PyTorch's dispatcher on any device, fake tensors included:
    each op's output storages as they are created (a view, or an output that is an input, costs
    nothing), each freed when its storage is; a storage that grows during the step (``resize_``,
    ``out=``) counts its growth. capstriton's ops are opened up: their Python bodies run under the
    count, so the scratch buffers they allocate count too (their kernels run as usual; under
    ``capstriton.ops._launch.recording`` on fake tensors nothing runs, and the buffers are the same
    since no launch parameter depends on values or on the device).

    What it cannot see: memory allocated outside the dispatcher (inductor's compiled code, cuBLAS
    workspaces, a tensor built from Python data by ``torch.tensor``) and the CUDA allocator's
    rounding to 512-byte blocks. Dense tensors only."""
    import weakref

    import torch
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            # per live storage seen (keyed by its StorageImpl address, forgotten when it dies, before
            # the address can serve another): its bytes when first seen as an input that existed
            # before the step (0 for one the step allocated), and its bytes counted beyond that
            self.base: dict[int, int] = {}
            self.counted: dict[int, int] = {}
            self.live = self.peak = 0

        def _forget(self, key: int) -> None:
            self.live -= self.counted.pop(key)
            del self.base[key]

        def _see(self, storage, existed: bool) -> None:
            key = storage._cdata
            if key not in self.base:
                self.base[key] = storage.nbytes() if existed else 0
                self.counted[key] = 0
                weakref.finalize(storage, self._forget, key)
            held = max(0, storage.nbytes() - self.base[key])
            self.live += held - self.counted[key]
            self.counted[key] = held
            self.peak = max(self.peak, self.live)

        @staticmethod
        def _storages(tree):
            for t in tree_leaves(tree):
                if isinstance(t, torch.Tensor):
                    yield t.untyped_storage()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for storage in self._storages((args, kwargs)):
                self._see(storage, existed=True)  # an input never seen: it existed before the step
            if func.namespace == "capstriton":
                opdef = OPDEFS.get(func._schema.name)
                if opdef is None:
                    raise TypeError(f"{func._schema.name} is not a torch.library custom op: its body cannot be counted")
                with self:  # the op's body, under the count
                    out = opdef._init_fn(*args, **kwargs)
            else:
                out = func(*args, **kwargs)
            for storage in self._storages((args, kwargs, out)):
                self._see(storage, existed=False)  # new outputs; inputs that grew
            return out

    count = Count()
    with count:
        step()
    return count.peak


def copy_bandwidth(device) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written per second), CUDA only."""
    import torch

    if device.type != "cuda":
        return None
    import triton.testing

    n = 256 * 2**20 // 4  # 256 MiB of float32: far beyond L2
    buffers = [torch.empty(n, device=device) for _ in range(2)]
    ms = triton.testing.do_bench(lambda: buffers[1].copy_(buffers[0]), warmup=25, rep=100, return_mode="median")
    bandwidth = 2 * n * 4 / (ms * 1e-3)
    buffers.clear()
    torch.cuda.empty_cache()
    return bandwidth


def is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------
# environment and output


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device, config: dict) -> dict:
    """Device, versions, command line, configuration and measurement method of a run."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        # Other processes skew CPU timings: the 1-minute load average says how busy it was.
        "load_average_start": load_average(),
        "capstriton_git": git_revision(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "timing": TIMING_NOTE[device.type],
        "memory_note": MEMORY_NOTE[device.type],
        "copy_bandwidth_bytes_per_s": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


def write_json(path: Path, data: dict) -> None:
    """Atomically (a sweep stopped mid-write leaves the previous complete file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def isolated_inductor_cache() -> None:
    """A private inductor cache per run, set before torch is imported: compile times are
    cold-cache ones, and no other process can delete files from under a running compile.
    Inductor keeps its precompiled C++ headers in the shared /tmp/torchinductor_<user> whatever
    the cache dir, and remembers them per process: if another process clears that folder, every
    later CPU compile fails, so they are turned off."""
    import tempfile

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        global _INDUCTOR_CACHE
        _INDUCTOR_CACHE = tempfile.TemporaryDirectory(prefix="capstriton-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE.name
    os.environ.setdefault("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")


_INDUCTOR_CACHE = None
