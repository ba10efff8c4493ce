"""Triton's interpreter without its redundant re-patching of ``triton.language`` (tests only).

Under ``TRITON_INTERPRET=1`` a kernel launch (``GridExecutor.__call__``) patches the language
modules its kernel sees (``tl``, ``tl.core``: each builtin wrapped for the interpreter, ``range``
and tensor methods replaced) and restores them when the launch ends. Every call of a
``@triton.jit`` helper inside the kernel (``InterpretedFunction.__call__``) patches again, with
``inspect.getmembers`` over ``tl``, ``tl.tensor``, ``tl.math`` and more, though what it would patch
is patched already: a builtin, once wrapped, is no longer a builtin and is skipped, and the rest is
set to functions of the same code (none keeps per-call state: the grid index lives in the
interpreter's builder). The kernels here call their helpers inside loops, so the repeats cost a
large share of the interpreter's time (cProfile of
``test_fused_layer_fp32[in37-out10-D33-Din9-R3-through]``, triton 3.9: 35,000 calls, 61 of 144 s).

``install()`` skips exactly those repeats: a helper's call inside a launch whose language modules
(a non-empty set) the launch has already patched. A helper that sees a module not yet patched in
this launch (``tl.sum`` and the other functions of ``triton.language.standard`` see ``tl.core``),
one that sees none (triton refuses it), and any call outside a launch (a jit function called on
the host) go to triton's own patching, so what triton leaves patched stays so. ``verifying()``
checks at each skipped call that triton's patching would have changed nothing (it runs it, compares
and undoes it); ``tests/test_interpreter.py`` does so in a fresh process and compares the kernels'
outputs bit for bit with triton's own way.
"""

from __future__ import annotations

import contextlib
import functools

#: patched: the ids of the language modules patched in the running launch (None outside one)
_state = {"patched": None, "skipped": 0, "verified": 0, "enabled": True, "verify": False}


class _NoScope:
    def restore(self) -> None:
        pass


def install() -> bool:
    """Wrap the interpreter's ``_patch_lang`` and ``GridExecutor.__call__``; False (nothing done)
    if this triton lays them out otherwise than 3.6 to 3.9 do."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or executor is None or not hasattr(interpreter, "InterpretedFunction"):
        return False
    if getattr(original, "_capstriton_once", False):
        return True
    languages = (tl, tl.core)

    def langs_of(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if any(v is lang for lang in languages))

    def patch_lang(fn):
        patched = _state["patched"]
        if patched is None:  # not inside a launch: as triton does
            return original(fn)
        langs = langs_of(fn)
        if langs and langs <= patched and _state["enabled"]:
            _state["skipped"] += 1
            if _state["verify"]:
                _check_fixed_point(original, fn)
            return _NoScope()
        scope = original(fn)
        _state["patched"] = patched | langs
        return scope

    launch = executor.__call__

    @functools.wraps(launch)
    def call(self, *args, **kwargs):
        outer = _state["patched"]
        _state["patched"] = frozenset()  # the launch's own patching is the first
        try:
            return launch(self, *args, **kwargs)
        finally:
            _state["patched"] = outer

    patch_lang._capstriton_once = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = call
    return True


def _same(a, b) -> bool:
    """``a`` and ``b`` behave the same: the same object, or functions (partials, properties) of the
    same code whose defaults and closures hold the same."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, functools.partial):
        return _same(a.func, b.func) and a.args == b.args and a.keywords == b.keywords
    if isinstance(a, property):
        return all(_same(getattr(a, f), getattr(b, f)) for f in ("fget", "fset", "fdel"))
    code = getattr(a, "__code__", None)
    if code is None or code is not b.__code__:
        return False
    cells = [(x.cell_contents, y.cell_contents) for x, y in zip(a.__closure__ or (), b.__closure__ or (), strict=True)]
    kw_a, kw_b = a.__kwdefaults__ or {}, b.__kwdefaults__ or {}
    return (
        len(a.__defaults__ or ()) == len(b.__defaults__ or ())
        and all(_same(x, y) for x, y in zip(a.__defaults__ or (), b.__defaults__ or (), strict=True))
        and kw_a.keys() == kw_b.keys()
        and all(_same(kw_a[k], kw_b[k]) for k in kw_a)
        and all(_same(x, y) for x, y in cells)
    )


def _check_fixed_point(original, fn) -> None:
    """Triton's patching for ``fn`` would change nothing: run it, compare, undo it."""
    scope = original(fn)
    try:
        for obj, name, before in scope._changes:
            after = getattr(obj, name)
            if not _same(before, after):
                raise AssertionError(f"re-patching for {fn.__name__} changes {getattr(obj, '__name__', obj)}.{name}")
    finally:
        scope.restore()
    _state["verified"] += 1


def counts() -> tuple[int, int]:
    """Helper calls that skipped the re-patching so far, and how many of them were verified."""
    return _state["skipped"], _state["verified"]


def in_launch() -> bool:
    return _state["patched"] is not None


@contextlib.contextmanager
def _setting(name: str, value: bool):
    before = _state[name]
    _state[name] = value
    try:
        yield
    finally:
        _state[name] = before


def repatching():
    """Within: every helper call patches the language again, as triton does by itself."""
    return _setting("enabled", False)


def verifying():
    """Within: each skipped call checks that triton's patching would have changed nothing."""
    return _setting("verify", True)
