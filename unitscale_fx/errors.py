"""Exception types raised by unitscale_fx.

Every error that concerns a graph node says *which* node (its FX name and op), *where* it came
from in the user's code (the ``stack_trace`` recorded by ``torch.export``) and *how* to fix it.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "UnitScaleError",
    "CaptureError",
    "MissingRuleError",
    "ConfigError",
    "PassError",
    "AlreadyTransformedError",
    "InputMismatchError",
    "user_frame_of_exception",
]


def _user_frame(stack_trace: str | None) -> str | None:
    """The last frame of a ``stack_trace`` that is not inside torch / unitscale_fx."""
    if not stack_trace:
        return None
    lines = [ln.strip() for ln in stack_trace.strip().splitlines()]
    frames = [ln for ln in lines if ln.startswith('File "')]
    for frame in reversed(frames):
        if "/torch/" not in frame and "/unitscale_fx/" not in frame:
            idx = lines.index(frame)
            code = lines[idx + 1] if idx + 1 < len(lines) and not lines[idx + 1].startswith('File "') else ""
            return f"{frame}\n    {code}".rstrip()
    return frames[-1] if frames else None


def _is_library_file(filename: str) -> bool:
    """torch, unitscale_fx, the standard library and generated code (``<string>``)."""
    import os

    f = filename.replace("\\", "/")
    if "/torch/" in f or "/unitscale_fx/" in f or f.startswith("<"):
        return True
    stdlib = os.path.dirname(os.__file__).replace("\\", "/") + "/"
    return f.startswith(stdlib) and "/site-packages/" not in f


def user_frame_of_exception(exc: BaseException) -> tuple[str | None, str | None]:
    """``(where, next_call)`` for the innermost frame of ``exc``'s traceback in user code.

    ``where`` is ``'File "x.py", line N, in f\n    code'`` (``None`` when every frame is in
    torch / unitscale_fx / the standard library); ``next_call`` is the name of the library function that
    frame called (what failed, e.g. ``guard_bool`` for a Python ``if`` on a tensor).
    """
    import traceback

    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    idx = None
    for i, fr in enumerate(frames):
        if not _is_library_file(fr.filename):
            idx = i
    if idx is None:
        return None, None
    fr = frames[idx]
    where = f'File "{fr.filename}", line {fr.lineno}, in {fr.name}'
    if fr.line:
        where += f"\n    {fr.line.strip()}"
    later = [f.name for f in frames[idx + 1:]]
    return where, ",".join(later) if later else None


def describe_node(node: Any) -> str:
    """``name = op(args)`` plus the user's source line, for error messages."""
    try:
        text = node.format_node()
    except Exception:  # pragma: no cover - defensive
        text = str(node)
    src = source_line(node)
    return f"{text}\n  at {src}" if src else text


def source_line(node: Any) -> str | None:
    meta = getattr(node, "meta", None) or {}
    return _user_frame(meta.get("stack_trace"))


class UnitScaleError(RuntimeError):
    """Base class of every error unitscale_fx raises on purpose."""


class ConfigError(UnitScaleError, ValueError):
    """An invalid :class:`unitscale_fx.Config` option."""


class CaptureError(UnitScaleError):
    """``torch.export`` could not capture the model as one graph."""


class InputMismatchError(CaptureError, ValueError):
    """A call does not fit the captured graph: other arguments than at capture, a different
    non-tensor value (baked into the graph), or a dimension outside the captured range.

    A subclass of :class:`CaptureError` (and of ``ValueError``); the message names the argument,
    what the graph was captured with, and the fix.
    """


class MissingRuleError(UnitScaleError):
    """An op has no scale rule and ``Config(strict=True)`` was asked for.

    ``.ops`` lists ``(node_name, op_name, source_line)`` of every op without a rule.
    """

    def __init__(self, message: str, ops: list[tuple[str, str, str | None]] | None = None):
        super().__init__(message)
        self.ops = list(ops or [])


class MissingRuleWarning(UserWarning):
    """Ops without a scale rule were left unscaled (``Config(strict=False)``, the default).

    The message lists each op with its node and source line; ``Config(strict=True)`` raises
    :class:`MissingRuleError` instead.
    """


class PassError(UnitScaleError):
    """A rewrite pass failed; the message names the pass and the passes that ran before it."""


class AlreadyTransformedError(UnitScaleError):
    """``transform`` was called on a model that is already unit-scaled."""
