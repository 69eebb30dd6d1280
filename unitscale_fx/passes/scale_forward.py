"""Forward unit scaling: static multiplies so that every matmul operand has unit RMS at init.

Policy (see docs/design.md):

* **matmul with a weight** (linear, mm/addmm after bias split, conv, einsum): the activation operand
  is normalised to unit RMS if the analysis predicts otherwise, and the output is multiplied by
  ``1/sigma_out`` (``1/sqrt(fan_in)`` for unit inputs). The *head* (a matmul whose output only
  reaches the loss or the outputs) gets ``1/fan_in`` instead (u-muP), so that logits start small and
  the initial loss is ``ln(vocab)``.
* **attention** (SDPA, or softmax-probabilities @ values): q, k, v are normalised to unit RMS and the
  output is multiplied by ``1/sigma_out``, a function of the sequence length and mask. In a
  hand-written attention that stays unfused (ALiBi through ``baddbmm``, soft-capped logits) the
  probabilities, whose RMS is about ``1/keys``, are a matmul operand too: they are multiplied to
  unit RMS before the ``probs @ v`` matmul (a fused kernel keeps them internal). An SDPA whose
  ``scale`` exceeds ``1/sqrt(head_dim)`` (T5's ``scale=1``: that model keeps its logits O(1) through
  the init of ``q``, which unit q/k no longer carry) gets ``scale=1/sqrt(head_dim)``, so its logits
  have unit variance like every other unit-scaled attention (``temperature`` in the counts).
* **residual adds** ``skip + branch`` (``skip`` an ancestor of ``branch``): weighted so that each of
  the ``i`` contributions to the residual stream has the same share:
  ``sqrt(i/(i+1)) * skip + sqrt(1/(i+1)) * branch`` (``residual="running_mean"``), or
  ``(skip + branch)/sqrt(2)`` (``"equal"``); each operand first divided by its predicted RMS.
* **other adds of two activations** (``tok_emb + pos_emb``): normalised to unit RMS.

The multiplies are part of the new forward, so the gradient of the rewritten graph is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import sympy
import torch
import torch.fx as fx

from ..analysis.context import RuleContext
from ..analysis.propagate import GraphAnalysis
from ..analysis.record import META_KEY, Stat
from ..analysis.registry import lookup
from ..analysis.rules import _is_param_like, _softmax_probs
from .base import Pass, PassResult, TransformState, materialize

aten = torch.ops.aten

__all__ = ["UnitScaleForward"]

_TOL = 0.05  # |log2 sigma| below which no normalising multiply is inserted

#: matmuls of two activations whose operands are normalised with the output compensated
_ACT_MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default}

_VIEWISH = {"view", "cast", "getitem", "expand", "slice", "dropout"}


def _kind(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    rule = lookup(node.target)
    return rule.kind if rule else None


def _rule_name(node: fx.Node) -> str | None:
    rule = lookup(node.target) if node.op == "call_function" else None
    return rule.name if rule else None


@dataclass(frozen=True)
class UnitScaleForward(Pass):
    name: ClassVar[str] = "unit_scale_forward"
    residual: str = "running_mean"
    head_rule: str = "mup"

    def __call__(self, gm: fx.GraphModule, state: TransformState) -> PassResult:
        cap = state.capture
        ga = GraphAnalysis(gm, hints=dict(state.hints), param_stats=dict(state.param_stats),
                           example_values=dict(cap.example_values))
        counts = {"matmul": 0, "head": 0, "operand": 0, "attention": 0, "temperature": 0, "compensate": 0,
                  "residual": 0, "add": 0}
        self_ = self

        def value(e: Any) -> float | None:
            return ga.value_of(e)

        def off_unit(st: Stat | None) -> bool:
            if st is None:
                return False
            v = value(st.rms)
            return v is not None and v > 0 and math.isfinite(v) and abs(math.log2(v)) > _TOL

        def scale_after(node: fx.Node, expr: Any, role: str, through_views: bool = False) -> fx.Node:
            # ``through_views``: multiply after the chain of layout ops that follows ``node`` (an
            # attention output's transpose / contiguous / reshape): the same function, and
            # inductor then fuses the multiply into the copy the layout change needs anyway
            # instead of materialising a scaled tensor in the old layout first
            anchor = node
            if through_views:
                chain = _layout_chain(node)
                for v in chain:
                    ga.visit(v)  # visited again in order later (records are recomputed)
                anchor = chain[-1] if chain else node
            with gm.graph.inserting_after(anchor):
                m = gm.graph.call_function(aten.mul.Tensor, (anchor, 1.0))
            anchor.replace_all_uses_with(m, delete_user_cb=lambda u: u is not m)
            factor = materialize(gm, state, expr, m)
            m.args = (anchor, factor)
            _copy_meta(anchor, m)
            if isinstance(factor, fx.Node):
                ga.visit(factor)
            rec = ga.visit(m)
            rec.role = role
            rec.factors["fwd"] = sympy.sympify(expr)
            node.meta[META_KEY].factors["fwd"] = sympy.sympify(expr)
            return m

        def scale_operand(user: fx.Node, operand: fx.Node, expr: Any, role: str) -> fx.Node:
            with gm.graph.inserting_before(user):
                m = gm.graph.call_function(aten.mul.Tensor, (operand, 1.0))
            factor = materialize(gm, state, expr, m)
            m.args = (operand, factor)
            _copy_meta(operand, m)
            m.meta["nn_module_stack"] = user.meta.get("nn_module_stack", m.meta.get("nn_module_stack"))
            m.meta["stack_trace"] = user.meta.get("stack_trace", m.meta.get("stack_trace"))
            user.replace_input_with(operand, m)
            if isinstance(factor, fx.Node):
                ga.visit(factor)
            rec = ga.visit(m)
            rec.role = role
            rec.factors["fwd"] = sympy.sympify(expr)
            return m

        def normalise_operands(node: fx.Node, names: list[str]) -> None:
            ctx = RuleContext(node, ga)
            for nm in names:
                a = ctx.arg(nm)
                if not isinstance(a, fx.Node) or _is_param_like(a) or not ga.requires_grad(a):
                    continue
                st = ga.fwd_of(a)
                if off_unit(st):
                    scale_operand(node, a, 1 / st.rms, "operand")
                    counts["operand"] += 1

        def before(node: fx.Node) -> None:
            if node in state.skipped_nodes:
                return
            kind, rname = _kind(node), _rule_name(node)
            if kind == "matmul" and self_._has_weight(node):
                names = _matmul_operands(node)
                normalise_operands(node, names)
            elif kind == "attention":
                normalise_operands(node, ["query", "key", "value"])
                if self_._unit_temperature(node, ga):
                    counts["temperature"] += 1
            elif kind == "matmul" and _softmax_probs(node.args[0], ga) is not None:
                # probabilities (RMS ~ 1/keys) and values both to unit RMS, as a fused kernel's
                # operands would be; the output multiply below takes the factor back out
                ctx = RuleContext(node, ga)
                normalise_operands(node, [ctx.name_of(0), ctx.name_of(1)])
            elif kind == "matmul" and node.target in _ACT_MATMULS and _two_activations(node, ga):
                # two activations (hand-written logits ``q @ k^T / scale``): unit operands, and the
                # output multiplied back so the function - e.g. the softmax temperature - is unchanged
                ctx = RuleContext(node, ga)
                old = node.args[:2]
                normalise_operands(node, [ctx.name_of(0), ctx.name_of(1)])
                moved = [ga.fwd_of(a).rms for a, b in zip(old, node.args[:2]) if b is not a]
                if moved:
                    node.meta["_us_compensate"] = sympy.Mul(*moved)
            elif rname == "add" and self_._is_residual(node, ga):
                self_._residual(node, ga, scale_operand, value)
                counts["residual"] += 1

        def after(node: fx.Node) -> None:
            if node in state.skipped_nodes:
                return
            rec = node.meta.get(META_KEY)
            if rec is None or rec.fwd is None or isinstance(rec.fwd, tuple):
                return
            kind, rname = _kind(node), _rule_name(node)
            if kind == "matmul" and self_._has_weight(node):
                if _is_head(node, ga):
                    k = _fan_in(node)
                    expr = 1 / (rec.fwd.rms * sympy.sqrt(k)) if self_.head_rule == "mup" else 1 / rec.fwd.rms
                    scale_after(node, expr, "head")
                    counts["head"] += 1
                elif off_unit(rec.fwd):
                    scale_after(node, 1 / rec.fwd.rms, "matmul")
                    counts["matmul"] += 1
            elif kind == "attention" or (kind == "matmul" and _softmax_probs(node.args[0], ga) is not None):
                if off_unit(rec.fwd):
                    scale_after(node, 1 / rec.fwd.rms, "attention", through_views=True)
                    counts["attention"] += 1
            elif node.meta.get("_us_compensate") is not None:
                scale_after(node, node.meta.pop("_us_compensate"), "compensate")
                counts["compensate"] += 1
            elif rname == "add" and node.meta.get("_us_residual"):
                pass
            elif rname == "add" and _two_activations(node, ga) and rec.fwd.trace is None and off_unit(rec.fwd):
                scale_after(node, 1 / rec.fwd.rms, "add")
                counts["add"] += 1

        ga.run_forward(before=before, after=after)
        state.counts.setdefault("analysis", {})
        state.final_analysis = ga  # every inserted node was visited: the records are current
        return PassResult(gm, any(counts.values()), counts, analysis_current=True)

    # ------------------------------------------------------------------------------------
    @staticmethod
    def _unit_temperature(node: fx.Node, ga: GraphAnalysis) -> bool:
        """Lower an SDPA ``scale`` above ``1/sqrt(head_dim)`` to ``1/sqrt(head_dim)``.

        With unit q and k the logits of one query have variance ``scale^2 * head_dim``. A model that
        passes ``scale=1`` (T5 and its descendants) relies on its ``q`` init (std ``1/sqrt(d_model
        * d_kv)``) for O(1) logits; with unit q/k its logits would have standard deviation
        ``sqrt(head_dim)`` (8 for 64-dim heads) and the softmax would start almost one-hot. Scales
        at or below ``1/sqrt(head_dim)`` (the default, muP's ``1/head_dim``) are the model's choice
        and are kept. Returns whether the scale was changed.
        """
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        scale = RuleContext(node, ga).arg("scale")
        if scale is None or not isinstance(val, torch.Tensor) or not isinstance(val.shape[-1], int):
            return False
        unit = 1.0 / math.sqrt(val.shape[-1])
        if not isinstance(scale, (int, float)) or float(scale) <= unit * (1 + 1e-6):
            return False
        node.meta.setdefault("_us_original_scale", float(scale))
        node.kwargs = {**node.kwargs, "scale": unit}  # keyword-only in the aten schema
        return True

    @staticmethod
    def _has_weight(node: fx.Node) -> bool:
        return any(_is_param_like(a) for a in node.all_input_nodes)

    @staticmethod
    def _is_residual(node: fx.Node, ga: GraphAnalysis) -> bool:
        if not _two_activations(node, ga):
            return False
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1:
            return False
        va, vb, vo = a.meta["val"], b.meta["val"], node.meta["val"]
        if tuple(va.shape) != tuple(vo.shape) or tuple(vb.shape) != tuple(vo.shape):
            return False
        sa, sb = ga.fwd_of(a), ga.fwd_of(b)
        if sa is None or sb is None or (sa.trace is not None and sb.trace is not None and sa.trace[0] is sb.trace[0]):
            return False
        if _is_ancestor(a, b):
            node.meta["_us_residual"] = ("skip0",)
            return True
        if _is_ancestor(b, a):
            node.meta["_us_residual"] = ("skip1",)
            return True
        return False

    def _residual(self, node: fx.Node, ga: GraphAnalysis, scale_operand, value) -> None:
        which = node.meta["_us_residual"][0]
        skip, branch = (node.args[0], node.args[1]) if which == "skip0" else (node.args[1], node.args[0])
        i = _res_count(skip)
        node.meta["_us_res_count"] = i + 1
        if self.residual == "running_mean":
            w_skip, w_branch = sympy.sqrt(sympy.Rational(i, i + 1)), sympy.sqrt(sympy.Rational(1, i + 1))
        else:
            w_skip = w_branch = 1 / sympy.sqrt(2)
        s_skip, s_branch = ga.fwd_of(skip), ga.fwd_of(branch)
        scale_operand(node, branch, w_branch / s_branch.rms, "residual_branch")
        scale_operand(node, skip, w_skip / s_skip.rms, "residual_skip")
        node.meta[META_KEY] = node.meta.get(META_KEY)


#: ops that only change the layout (or make it contiguous) of one tensor
_LAYOUT_OPS = {aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.clone.default,
               aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}


def _layout_chain(node: fx.Node) -> list[fx.Node]:
    """The single-user layout ops that follow ``node`` (first argument to first argument)."""
    chain, cur = [], node
    while len(cur.users) == 1:
        (u,) = cur.users
        if u.op != "call_function" or u.target not in _LAYOUT_OPS or u.args[0] is not cur:
            break
        chain.append(u)
        cur = u
    return chain


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for k in ("val", "nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def _two_activations(node: fx.Node, ga: GraphAnalysis) -> bool:
    if len(node.args) < 2:
        return False
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    if _is_param_like(a) or _is_param_like(b):
        return False
    return ga.requires_grad(a) and ga.requires_grad(b)


def _is_ancestor(anc: fx.Node, node: fx.Node, limit: int = 20000) -> bool:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a is anc:
                return True
            if a not in seen and a.op == "call_function":
                seen.add(a)
                stack.append(a)
    return False


def _res_count(skip: fx.Node) -> int:
    n, hops = skip, 0
    while isinstance(n, fx.Node) and hops < 64:
        c = n.meta.get("_us_res_count")
        if c is not None:
            return c
        if n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node) and _kind(n) in ("view", "dropout", "scale", "mul"):
            n = n.args[0]
            hops += 1
            continue
        break
    return 1


def _matmul_operands(node: fx.Node) -> list[str]:
    packet = getattr(node.target, "overloadpacket", None)
    if packet in (aten.linear, aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d, aten._convolution):
        return ["input"]
    if packet in (aten.mm, aten.bmm, aten.matmul):
        return ["input", "other"] if packet is aten.matmul else ["input", "mat2"]
    if packet in (aten.addmm, aten.baddbmm):
        return ["mat1", "mat2"] if packet is aten.addmm else ["batch1", "batch2"]
    if packet is aten.einsum:
        return []
    return []


def _fan_in(node: fx.Node) -> sympy.Expr:
    from ..analysis.context import sym

    packet = getattr(node.target, "overloadpacket", None)
    a = node.args[0] if packet not in (aten.addmm, aten.baddbmm) else node.args[1]
    if packet in (aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d):
        w = node.args[1].meta["val"]
        return sympy.Mul(*[sym(s) for s in w.shape[1:]])
    return sym(a.meta["val"].shape[-1])


def _is_head(node: fx.Node, ga: GraphAnalysis) -> bool:
    """Output reaches only the loss and/or graph outputs, through view-like ops, its own bias or a
    constant one, and logit soft-capping (``tanh(logits / cap) * cap``: Gemma 2)."""
    frontier = [node]
    seen = 0
    reached_loss_or_out = False
    while frontier and seen < 64:
        n = frontier.pop()
        for u in n.users:
            seen += 1
            if u.op == "output":
                reached_loss_or_out = True
                continue
            if u.op == "call_function" and not isinstance(u.meta.get("val"), (torch.Tensor, tuple, list)):
                continue  # runtime asserts (``_assert_tensor_metadata``) and other value-less ops
            k = _kind(u)
            if k == "loss":
                reached_loss_or_out = True
                continue
            if k in ("view", "dropout", "scale") or _rule_name(u) in _VIEWISH:
                frontier.append(u)
                continue
            if _rule_name(u) == "add" and all(
                a is n or not isinstance(a, fx.Node) or a.op == "get_attr" or not ga.requires_grad(a)
                for a in u.args[:2]
            ):
                frontier.append(u)  # the head's own bias (split from the matmul), or a constant
                continue            # one (BART's final_logits_bias buffer, cast with .to())
            if _rule_name(u) == "tanh" or (_rule_name(u) in ("mul", "div") and all(
                    a is n or not isinstance(a, fx.Node) or not ga.requires_grad(a) for a in u.args[:2])):
                frontier.append(u)  # soft-capping: a bounded monotone map of the logits
                continue
            return False
    return reached_loss_or_out
