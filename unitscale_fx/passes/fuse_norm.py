"""Fuse hand-written RMS norms into one ``aten.rms_norm`` call.

Many models write their RMS norm out (T5's ``T5LayerNorm``, Llama's ``LlamaRMSNorm``, Mistral,
Gemma...). In the captured graph it is five or six ops::

    xf = x.to(float32)                            # optional up-cast
    v  = xf.pow(2).mean(dims, keepdim=True)       # or xf * xf; dims: the trailing dims
    y  = x * rsqrt(v + eps)                       # or xf * ...; or x / sqrt(v + eps)
    y  = w * y                                    # optional gain (a parameter of the normalised shape)

and becomes ``aten.rms_norm(xf, normalized_shape, w, eps)``: the same function, forward and
backward, in one op. Why it matters for unit scaling: the pieces of the written-out form are edges of
their own, and the backward of the mean-of-squares branch (a per-row sum of ``g * x``) has a scale set
by how the gradient correlates with the activation, which the per-edge analysis does not track (see
docs/prediction_accuracy.md); as one op, the norm has one scale rule whose backward is exact in form
(``g * w / rms(x)`` less the radial part). It is also fewer kernels.

It does **not** fire when an intermediate (``v``, ``v + eps``, the reciprocal root) is used by
anything else, when the mean is not over the trailing dims with ``keepdim=True``, when ``eps`` is
not a constant number, or when the normalised operand is not the tensor whose squares were taken
(or that tensor before an exact up-cast). The gain is folded in only when it directly follows, has
the normalised shape and the activation's dtype; otherwise the multiply stays as it was.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from .base import Pass, PassResult, TransformState

aten = torch.ops.aten

__all__ = ["FuseRMSNorm"]

_CASTS = (aten.to, aten._to_copy)
_ASSERTS = (aten._assert_tensor_metadata.default,)
#: dtypes a value can be cast up to float32 from without changing it
_EXACT_INTO_F32 = (torch.float16, torch.bfloat16, torch.float32)


def _packet(n: Any) -> Any:
    return getattr(getattr(n, "target", None), "overloadpacket", getattr(n, "target", None))


def _users(n: fx.Node) -> list[fx.Node]:
    """Users that consume the value (runtime metadata asserts do not)."""
    return [u for u in n.users if u.target not in _ASSERTS]


def _only_user(n: fx.Node) -> fx.Node | None:
    us = _users(n)
    return us[0] if len(us) == 1 else None


def _val(n: Any) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _squared(p: fx.Node) -> fx.Node | None:
    """``x`` if ``p`` is ``x ** 2`` (``pow(x, 2)`` or ``x * x``)."""
    if p.op != "call_function":
        return None
    if p.target is aten.pow.Tensor_Scalar and len(p.args) == 2 and p.args[1] == 2 and isinstance(p.args[0], fx.Node):
        return p.args[0]
    if p.target is aten.mul.Tensor and len(p.args) == 2 and p.args[0] is p.args[1] and isinstance(p.args[0], fx.Node):
        return p.args[0]
    if p.target is aten.square.default and isinstance(p.args[0], fx.Node):
        return p.args[0]
    return None


def _cast_source(n: fx.Node) -> fx.Node | None:
    """``x`` if ``n`` is an exact float32 up-cast of ``x`` (``x.to(float32)``, nothing else changed)."""
    if n.op != "call_function" or _packet(n) not in _CASTS or not isinstance(n.args[0], fx.Node):
        return None
    src, out = _val(n.args[0]), _val(n)
    if src is None or out is None or out.dtype != torch.float32 or src.dtype not in _EXACT_INTO_F32:
        return None
    if tuple(src.shape) != tuple(out.shape) or src.device != out.device:
        return None
    return n.args[0]


@dataclass(frozen=True)
class FuseRMSNorm(Pass):
    name: ClassVar[str] = "fuse_rms_norm"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        counts = {"fused": 0, "gain": 0, "rejected": 0}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (aten.rsqrt.default, aten.sqrt.default):
                continue
            if node in state.skipped_nodes:
                continue
            match = _match(node)
            if match is None:
                if _looks_like_norm(node):
                    counts["rejected"] += 1
                continue
            self._rewrite(gm, match, counts)
        if counts["fused"]:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, counts["fused"] > 0, counts)

    @staticmethod
    def _rewrite(gm: fx.GraphModule, m: dict, counts: dict[str, int]) -> None:
        out: fx.Node = m["gain_mul"] or m["norm_mul"]
        weight = m["weight"]
        with gm.graph.inserting_before(out):
            rn = gm.graph.call_function(aten.rms_norm.default, (m["x"], list(m["shape"]), weight, m["eps"]))
        rn.meta = dict(out.meta)
        # the norm module's context, not the gain multiply's (they are the same module in practice)
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in m["norm_mul"].meta:
                rn.meta[k] = m["norm_mul"].meta[k]
        rn.meta["_us_fused_from"] = [n.name for n in m["nodes"]]
        out.replace_all_uses_with(rn)
        for n in reversed(m["nodes"]):
            for u in list(n.users):
                if u.target in _ASSERTS and u is not rn:
                    gm.graph.erase_node(u)
            if not n.users:
                gm.graph.erase_node(n)
        counts["fused"] += 1
        counts["gain"] += weight is not None


def _looks_like_norm(root: fx.Node) -> bool:
    """A reciprocal root of ``mean(x ** 2) + eps``: counted as rejected when it does not fuse."""
    a = root.args[0] if root.args else None
    if not isinstance(a, fx.Node) or _packet(a) is not aten.add or not a.args:
        return False
    m = a.args[0] if isinstance(a.args[0], fx.Node) else (a.args[1] if len(a.args) > 1 else None)
    return isinstance(m, fx.Node) and _packet(m) is aten.mean


def _match(root: fx.Node) -> dict | None:
    """The pieces of a hand-written RMS norm whose root (``rsqrt`` / ``sqrt``) is ``root``, or None."""
    # ---- v + eps
    add = root.args[0]
    if not isinstance(add, fx.Node) or add.target is not aten.add.Tensor or _only_user(add) is not root:
        return None
    if add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    mean, eps = add.args
    if not isinstance(mean, fx.Node):
        mean, eps = eps, mean
    if not isinstance(mean, fx.Node) or not isinstance(eps, numbers.Real) or isinstance(eps, bool) or eps < 0:
        return None
    # ---- mean(x ** 2, trailing dims, keepdim=True)
    if mean.target is not aten.mean.dim or _only_user(mean) is not add:
        return None
    sq = mean.args[0]
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if mean.kwargs.get("dtype") is not None or not keepdim or not isinstance(sq, fx.Node) or _only_user(sq) is not mean:
        return None
    xp = _squared(sq)
    vx = _val(xp)
    if xp is None or vx is None or not vx.is_floating_point() or dims is None:
        return None
    nd = vx.dim()
    dims = sorted(int(d) % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
    if not dims or dims != list(range(nd - len(dims), nd)):
        return None
    shape = tuple(vx.shape[nd - len(dims):])
    # ---- x * rsqrt(...) or x / sqrt(...)
    user = _only_user(root)
    if user is None or len(user.args) != 2:
        return None
    if root.target is aten.rsqrt.default and user.target is aten.mul.Tensor:
        xm = user.args[0] if user.args[1] is root else (user.args[1] if user.args[0] is root else None)
    elif root.target is aten.sqrt.default and user.target is aten.div.Tensor and user.args[1] is root:
        xm = user.args[0]
    else:
        return None
    if not isinstance(xm, fx.Node) or xm is root:
        return None
    if xm is not xp and _cast_source(xp) is not xm:
        return None
    vy = _val(user)
    if vy is None or vy.dtype != vx.dtype or tuple(vy.shape) != tuple(vx.shape):
        return None  # the product would promote to another dtype or broadcast: not rms_norm(xp)
    nodes = [sq, mean, add, root, user]
    # ---- optional gain: w * y (w a parameter of the normalised shape, same dtype)
    gain_mul, weight = None, None
    g = _only_user(user)
    between = []
    if g is not None and _packet(g) in _CASTS and _val(g) is not None and _val(g).dtype == vy.dtype:
        between, g = [g], _only_user(g)  # a cast back to the dtype it already has (Llama in float32)
    prev = between[-1] if between else user
    if g is not None and g.target is aten.mul.Tensor and len(g.args) == 2 and prev in g.args:
        w = g.args[1] if g.args[0] is prev else g.args[0]
        vw = _val(w)
        if (isinstance(w, fx.Node) and w.op in ("get_attr", "placeholder") and vw is not None
                and tuple(vw.shape) == shape and vw.dtype == vy.dtype and w is not prev
                and tuple(_val(g).shape) == tuple(vy.shape)):
            gain_mul, weight = g, w
            nodes += between + [g]
    return {"x": xp, "shape": shape, "eps": float(eps), "weight": weight, "norm_mul": user,
            "gain_mul": gain_mul, "nodes": nodes}
