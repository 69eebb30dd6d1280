"""Fuse hand-written attention into one scaled-dot-product-attention call.

Recognised (each intermediate must have exactly one user, else the pattern does not fire)::

    s = matmul(q, transpose(k, -2, -1))          # or bmm / k.mT / permute
      | baddbmm(bias, q, k^T, beta=b, alpha=a)    # or a constant bias (ALiBi): scale a, mask b * bias
    s = s.view(B, H, S, S')                       # optional: heads split off a [B*H, S, S'] product
    s = s * c   |  s / c                          # optional constant scale
    s = masked_fill(s, mask, -inf) | s + m        # optional boolean mask or constant additive mask
    p = softmax(s.float(), -1).to(dtype)          # optional up-cast and cast back
    p = dropout(p)                                # optional
    p = p.view(B * H, S, S')                      # optional, back to the product's layout
    o = matmul(p, v)

It does **not** fire when the scores or probabilities are used by anything else (returned
attention weights), when anything else is applied to the scores (``tanh`` soft-capping...), when the
additive mask carries a gradient (a learned position bias) or depends on nothing it can evaluate.
Causal masks proven equal to ``tril`` become ``is_causal=True``. With a view between the product and
the masks (BLOOM), SDPA runs in the product's ``[B*H, S, d]`` layout and the masks are expanded to
``[B, H, S, S']`` and flattened to it; a constant bias is added to the mask (a float ``attn_mask``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ..runtime import attention as rt_attention
from ..runtime import dropout as rt_dropout
from .base import Pass, PassResult, TransformState

aten = torch.ops.aten

__all__ = ["FuseAttention"]

_MATMUL = (aten.matmul, aten.bmm)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view)
_CASTS = (aten.to, aten._to_copy)


def _packet(n: Any) -> Any:
    return getattr(getattr(n, "target", None), "overloadpacket", getattr(n, "target", None))


_ASSERTS = (aten._assert_tensor_metadata.default,)


def _real_users(n: fx.Node) -> list[fx.Node]:
    """Users that consume the value (runtime metadata asserts do not)."""
    return [u for u in n.users if u.target not in _ASSERTS]


def _single_user(n: fx.Node) -> bool:
    return len(_real_users(n)) == 1


def _is_last_two_transpose(n: fx.Node) -> fx.Node | None:
    """``k`` if ``n`` is ``k`` with its last two dims swapped."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    p = _packet(n)
    nd = n.args[0].meta["val"].dim() if isinstance(n.args[0], fx.Node) and "val" in n.args[0].meta else None
    if nd is None:
        return None
    if p is aten.transpose:
        d0, d1 = (a % nd for a in n.args[1:3])
        if {d0, d1} == {nd - 1, nd - 2}:
            return n.args[0]
    if p is aten.permute:
        perm = [a % nd for a in n.args[1]]
        if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return n.args[0]
    return None


@dataclass(frozen=True)
class FuseAttention(Pass):
    name: ClassVar[str] = "fuse_attention"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        counts = {"fused": 0, "causal": 0, "masked": 0, "rejected": 0}
        from ..analysis.propagate import GraphAnalysis

        ga = GraphAnalysis(gm, hints=dict(state.hints), example_values=dict(state.capture.example_values))
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or _packet(node) not in (aten.softmax, aten._softmax):
                continue
            if node in state.skipped_nodes:
                continue
            match = self._match(node, ga)
            if match is None:
                counts["rejected"] += 1
                continue
            self._rewrite(gm, match, counts)
        # attention already fused by the model (HF "sdpa"): a constant causal mask becomes is_causal
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
                continue
            if node in state.skipped_nodes:
                continue
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            if not isinstance(mask, fx.Node) or node.kwargs.get("is_causal") or len(node.args) > 5:
                continue
            kind = _classify_mask(ga, mask, masked_is_true=None)
            if kind is None:
                continue
            q = node.args[0]
            kw = dict(node.kwargs)
            kw["attn_mask"] = None
            kw["is_causal"] = kind == "causal"
            if kind == "causal" and q.meta["val"].shape[-2] != node.args[1].meta["val"].shape[-2]:
                continue
            node.args = tuple(node.args[:3])
            node.kwargs = kw
            counts["sdpa_mask_" + kind] = counts.get("sdpa_mask_" + kind, 0) + 1
        gm.graph.eliminate_dead_code()
        changed = counts["fused"] > 0 or any(k.startswith("sdpa_mask") for k in counts)
        return PassResult(gm, changed, counts)

    def _match(self, softmax: fx.Node, ga) -> dict | None:
        dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
        if dim not in (-1, softmax.meta["val"].dim() - 1):
            return None
        if not _single_user(softmax):
            return None
        nodes = [softmax]
        # ---- walk down: cast back, dropout, matmul with v
        cur = softmax
        user = _real_users(cur)[0]
        dropout_p = 0.0
        mode = None
        while True:
            p = _packet(user)
            if p in _CASTS and _single_user(user):
                nodes.append(user)
                cur, user = user, _real_users(user)[0]
                continue
            if (user.target is rt_dropout or p is aten.dropout) and _single_user(user):
                dropout_p = float(user.args[1])
                if user.target is rt_dropout:
                    mode = user.args[2]
                elif not (user.args[2] if len(user.args) > 2 else True):
                    dropout_p = 0.0
                nodes.append(user)
                cur, user = user, _real_users(user)[0]
                continue
            break
        view_down = None
        if _packet(user) in _VIEWS and _single_user(user):
            view_down, cur, user = user, user, _real_users(user)[0]
        if _packet(user) not in _MATMUL or user.args[0] is not cur:
            return None
        out, v = user, user.args[1]
        # ---- walk up: cast, mask, scale, matmul(q, k^T)
        cur = softmax.args[0]
        mask_bool = None
        add_mask = None
        scale = 1.0
        view_up = None
        while isinstance(cur, fx.Node) and cur.op == "call_function":
            p = _packet(cur)
            if not _single_user(cur):
                return None
            if p in _CASTS:
                nodes.append(cur)
                cur = cur.args[0]
                continue
            if p is aten.masked_fill and mask_bool is None and add_mask is None:
                value = cur.args[2]
                if not (isinstance(value, float) and value == float("-inf")):
                    return None
                mask_bool = cur.args[1]
                nodes.append(cur)
                cur = cur.args[0]
                continue
            if p is aten.add and add_mask is None and mask_bool is None:
                a, b = cur.args[0], cur.args[1]
                if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                    return None
                # the mask is the operand that carries no gradient
                ga_rg = _requires_grad_chain(b)
                if ga_rg:
                    return None
                add_mask = b
                nodes.append(cur)
                cur = a
                continue
            if p in (aten.mul, aten.div) and isinstance(cur.args[1], (int, float)):
                scale = scale * (cur.args[1] if p is aten.mul else 1.0 / cur.args[1])
                nodes.append(cur)
                cur = cur.args[0]
                continue
            if p in _VIEWS and view_up is None and (view_down is not None) and _splits_heads(cur):
                view_up = cur
                nodes.append(cur)
                cur = cur.args[0]
                continue
            break
        bias = None
        beta = alpha = 1.0
        if isinstance(cur, fx.Node) and _packet(cur) is aten.baddbmm and _single_user(cur):
            b = cur.args[0]
            if not isinstance(b, fx.Node) or _requires_grad_chain(b) or not _data_free_or_const(ga, b):
                return None
            bias = b
            beta = float(cur.kwargs.get("beta", 1.0))
            alpha = float(cur.kwargs.get("alpha", 1.0))
            q, kt = cur.args[1], cur.args[2]
        elif not (isinstance(cur, fx.Node) and _packet(cur) in _MATMUL and _single_user(cur)):
            return None
        else:
            q, kt = cur.args[0], cur.args[1]
        if (view_up is None) != (view_down is None):
            return None
        if view_down is not None:
            nodes.append(view_down)
        scale = scale * alpha
        k = _is_last_two_transpose(kt)
        if k is None:
            return None
        nodes.append(cur)
        qv, kv, vv = (x.meta.get("val") for x in (q, k, v))
        if any(not isinstance(t, torch.Tensor) for t in (qv, kv, vv)) or qv.dim() < 3:
            return None
        if qv.dim() != kv.dim() or kv.dim() != vv.dim():
            return None
        causal = False
        if bias is not None or view_up is not None:
            # masks stay explicit: in the outer layout, or added to a constant bias
            return dict(q=q, k=k, v=v, out=out, kt=kt, nodes=nodes, scale=scale, mask_bool=mask_bool,
                        add_mask=add_mask, causal=False, dropout_p=dropout_p, mode=mode, bias=bias, beta=beta,
                        view_up=view_up)
        if mask_bool is not None:
            kind = _classify_mask(ga, mask_bool, masked_is_true=True)
            causal = kind == "causal"
            if kind == "full":
                mask_bool = None
        if add_mask is not None:
            kind = _classify_mask(ga, add_mask, masked_is_true=None)
            if kind == "causal":
                causal, add_mask = True, None
            elif kind == "full":
                add_mask = None
        return dict(q=q, k=k, v=v, out=out, kt=kt, nodes=nodes, scale=scale, mask_bool=mask_bool,
                    add_mask=add_mask, causal=causal, dropout_p=dropout_p, mode=mode, bias=None, beta=1.0,
                    view_up=None)

    def _rewrite(self, gm: fx.GraphModule, m: dict, counts: dict) -> None:
        out = m["out"]
        g = gm.graph
        with g.inserting_before(out):
            mask = None
            if m["bias"] is not None or m["view_up"] is not None:
                mask = self._combined_mask(g, m)
            elif m["mask_bool"] is not None and not m["causal"]:
                mask = g.call_function(aten.logical_not.default, (m["mask_bool"],))
                mask.meta["val"] = torch.logical_not(m["mask_bool"].meta["val"]) if "val" in m["mask_bool"].meta else None
            elif m["add_mask"] is not None:
                mask = m["add_mask"]
            if m["dropout_p"] > 0 and m["mode"] is not None:
                new = g.call_function(rt_attention, (), dict(
                    query=m["q"], key=m["k"], value=m["v"], attn_mask=mask, dropout_p=m["dropout_p"],
                    mode=m["mode"], is_causal=m["causal"], scale=float(m["scale"])))
            else:
                new = g.call_function(aten.scaled_dot_product_attention.default, (m["q"], m["k"], m["v"]), dict(
                    attn_mask=mask, dropout_p=m["dropout_p"], is_causal=m["causal"], scale=float(m["scale"])))
        new.meta.update({k: v for k, v in out.meta.items() if k != "unitscale"})
        out.replace_all_uses_with(new)
        for n in [out] + m["nodes"]:
            for u in list(n.users):
                if u.target in _ASSERTS:
                    g.erase_node(u)
            if not n.users and n.graph is g:
                g.erase_node(n)
        if not m["kt"].users:
            g.erase_node(m["kt"])
        counts["fused"] += 1
        counts["causal" if m["causal"] else "masked"] += int(m["causal"] or mask is not None)
        if m["bias"] is not None:
            counts["bias"] = counts.get("bias", 0) + 1

    @staticmethod
    def _combined_mask(g: fx.Graph, m: dict) -> fx.Node | None:
        """One float ``attn_mask`` in the product's layout: ``beta * bias``, plus the masks (written in
        the ``[B, H, S, S']`` layout of ``view_up``: expanded to it and flattened to ``[B*H, S, S']``)."""
        def outer(mask: fx.Node) -> fx.Node:
            if m["view_up"] is None:
                return mask
            shape = list(m["view_up"].args[1])
            e = g.call_function(aten.expand.default, (mask, shape))
            return g.call_function(aten.flatten.using_ints, (e, 0, 1))

        parts = []
        if m["bias"] is not None:
            b = m["bias"]
            if m["beta"] != 1.0:
                b = g.call_function(aten.mul.Tensor, (b, m["beta"]))
            parts.append(b)
        if m["add_mask"] is not None:
            parts.append(outer(m["add_mask"]))
        mask = parts[0] if parts else None
        for p in parts[1:]:
            mask = g.call_function(aten.add.Tensor, (mask, p))
        if m["mask_bool"] is not None:
            masked = outer(m["mask_bool"])
            base = mask if mask is not None else g.call_function(
                aten.zeros_like.default, (masked,), {"dtype": m["q"].meta["val"].dtype})
            mask = g.call_function(aten.where.ScalarSelf, (masked, float("-inf"), base))
        return mask


def _splits_heads(view: fx.Node) -> bool:
    """``view`` turns a ``[N, S, S']`` product into ``[..., S, S']`` (heads split off the leading dim)."""
    src, dst = view.args[0].meta.get("val"), view.meta.get("val")
    if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)) or src.dim() != 3 or dst.dim() < 3:
        return False
    shape = list(view.args[1]) if len(view.args) > 1 else []
    if any(isinstance(d, int) and d == -1 for d in shape[:-1]):
        return False  # ``expand`` of a mask to this shape needs every leading size
    return [str(d) for d in src.shape[-2:]] == [str(d) for d in dst.shape[-2:]]


def _data_free_or_const(ga: Any, n: fx.Node) -> bool:
    """A constant bias: no gradient, and evaluable (from shapes, or the example's attention mask)."""
    return ga.const_value(n) is not None


def _data_free(n: fx.Node, seen: set | None = None) -> bool:
    """Whether ``n`` depends on no user-input *data* (shapes are fine) and on no parameter.

    A mask that passes this test is a function of the shapes only (``tril`` of a buffer slice, an
    ``arange`` comparison), so its structure at the example shape holds for every shape.
    """
    seen = set() if seen is None else seen
    if n in seen:
        return True
    seen.add(n)
    if n.op == "placeholder":
        return False
    if n.op == "get_attr":
        return not _attr_is_param(n)
    if n.op == "call_function" and getattr(n.target, "overloadpacket", None) in (aten.sym_size, aten.sym_numel):
        return True
    return all(_data_free(a, seen) for a in n.all_input_nodes)


def _classify_mask(ga: Any, node: fx.Node, masked_is_true: bool | None) -> str | None:
    """``"causal"`` / ``"full"`` for a shape-only mask proven equal to ``tril`` / all-allowed.

    ``masked_is_true``: boolean masks where True means *masked* (``masked_fill``); ``None``: an
    SDPA-style mask (bool True = allowed, or additive float with ``-inf``/large negatives).
    """
    if not _data_free(node):
        return None
    m = ga.const_value(node)
    if not isinstance(m, torch.Tensor) or m.dim() < 2:
        return None
    if m.dtype == torch.bool:
        allowed = ~m if masked_is_true else m
    elif masked_is_true:
        allowed = m == 0
    else:
        if bool((m > 0).any()) or not bool(((m == 0) | (m < -1e4)).all()):
            return None  # a real additive bias, not a mask
        allowed = m == 0
    n_q, n_k = allowed.shape[-2], allowed.shape[-1]
    allowed = allowed.reshape(-1, n_q, n_k)
    if bool(allowed.all()):
        return "full"
    tril = torch.ones(n_q, n_k, dtype=torch.bool).tril()
    if n_q == n_k and bool((allowed == tril).all()):
        return "causal"
    return None


def _requires_grad_chain(n: fx.Node, depth: int = 0) -> bool:
    """Whether ``n`` depends on a parameter or a floating user input that needs a gradient."""
    if depth > 64:
        return True
    if n.op == "get_attr":
        t = n.meta.get("val")
        return isinstance(t, torch.nn.Parameter) or bool(getattr(t, "requires_grad", False)) or _attr_is_param(n)
    if n.op == "placeholder":
        return False
    return any(_requires_grad_chain(a, depth + 1) for a in n.all_input_nodes)


def _attr_is_param(n: fx.Node) -> bool:
    try:
        obj = n.graph.owning_module
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return isinstance(obj, torch.nn.Parameter)
    except AttributeError:
        return False
