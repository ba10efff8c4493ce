"""Triton's interpreter without its redundant re-patching of ``triton.language`` (tests only).

Under ``TRITON_INTERPRET=1`` a kernel launch (``GridExecutor.__call__``) patches the language
modules its kernel sees (``tl``, ``tl.core``: each builtin wrapped for the interpreter, ``range``
and tensor methods replaced) and restores them when the launch ends. Every call of a
``@triton.jit`` helper inside the kernel (``InterpretedFunction.__call__``) patches again, with
``inspect.getmembers`` over ``tl``, ``tl.tensor``, ``tl.math`` and more, though what it would patch
is patched already: a builtin, once wrapped, is no longer a builtin and is skipped, and the rest is
set to functions that behave the same. The kernels here call their helpers inside loops, so the
repeats cost a large share of the interpreter's time (cProfile of
``test_fused_layer_fp32[in37-out10-D33-Din9-R3-through]``, triton 3.9: 35,000 calls, 61 of 144 s).

``install()`` skips exactly those repeats: a helper's call inside a launch whose language modules
the launch has already patched. A helper that sees a module not yet patched in this launch
(``tl.sum`` and the other functions of ``triton.language.standard`` see ``tl.core``) is patched as
triton does it, and what triton's own calls would leave patched after the launch stays so. The
kernels compute what they computed before: ``test_interpreter.py`` compares the fused layer's
outputs and gradients bit for bit with the patching on every call.
"""

from __future__ import annotations

import contextlib
import inspect

_state = {"patched": None, "skipped": 0, "enabled": True}


class _NoScope:
    def restore(self) -> None:
        pass


class _LaunchScope:
    """The scope of a launch's own patching: restoring it ends the launch."""

    def __init__(self, scope):
        self._scope = scope

    def restore(self) -> None:
        _state["patched"] = None
        self._scope.restore()


def install() -> bool:
    """Wrap the interpreter's ``_patch_lang``; False (nothing done) if this triton lays it out
    otherwise than 3.6 to 3.9 do."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_capstriton_once", False):
        return original is not None
    if not hasattr(interpreter, "GridExecutor") or not hasattr(interpreter, "InterpretedFunction"):
        return False
    languages = (tl, tl.core)

    seen: dict = {}  # a function's module globals -> the language modules among them

    def langs_of(fn) -> frozenset:
        key = id(fn.__globals__)
        if key not in seen:
            seen[key] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in languages)
        return seen[key]

    def patch_lang(fn):
        patched = _state["patched"]
        if patched is None:  # a launch
            scope = original(fn)
            _state["patched"] = langs_of(fn)
            return _LaunchScope(scope)
        langs = langs_of(fn)
        if _state["enabled"] and langs <= patched:
            _state["skipped"] += 1
            return _NoScope()
        _state["patched"] = patched | langs
        return original(fn)

    patch_lang._capstriton_once = True
    interpreter._patch_lang = patch_lang
    return True


def skipped() -> int:
    """How many helper calls have skipped the re-patching so far."""
    return _state["skipped"]


@contextlib.contextmanager
def repatching():
    """Within: every helper call patches the language again, as triton does by itself."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before
