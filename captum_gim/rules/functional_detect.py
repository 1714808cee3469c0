r"""What the functional layer infers from the operations of one forward pass.

:mod:`captum_gim.rules.functional` runs a model's forward pass inside a
:class:`~torch.overrides.TorchFunctionMode`; every torch function call goes through
:meth:`Provenance.run`, which computes it and remembers, for the tensors it produced, the
little that GIM needs to know about where they came from. No tensor subclass is used: the
facts live in a map from ``id(tensor)`` to ``(weakref, tag)``, valid for one forward pass
and dropped with it.

What is tracked, and the heuristics (the limits are listed in ``docs/any_model.rst``):

- **constants**: the model's parameters and buffers, and whatever is computed from
  constants only (``W.t()``, ``torch.ones(...)``, a causal-mask buffer sliced and
  compared). Every other tensor - the forward's inputs, what hooks substitute, everything
  computed from them - is a *hidden-state* tensor.
- **attention scores**: the output of a ``matmul`` / ``@`` / ``bmm`` / ``baddbmm`` /
  ``mm`` / two-operand ``einsum`` whose two operands are both hidden-state tensors,
  followed through any op that keeps at least its size (scaling, masking, adding a bias,
  soft-capping, ``torch.cat`` with sink logits, views, dtype casts). When a softmax takes
  such scores, it is an attention softmax: it gets TSG, and the two operands of each score
  product that fed it get their gradient multiplied by 1/4 (q and k x1/4: the product's
  operands are wrapped, when the product runs, in an identity whose gradient factor is
  decided at the softmax, :class:`_Deferred`).
- **attention weights**: the output of that softmax, followed through the same
  size-keeping ops (dropout, casts, head masks, views). A product of attention weights
  with a hidden-state tensor is the value product: the gradient of its value operand is
  multiplied by 1/2 (v x1/2), the weights' gradient is left as it is.
- **hand-written norms**: ``x.pow(2)`` / ``x ** 2`` / ``x * x`` / ``x.square()``
  followed by ``mean`` (or ``sum`` then a division by a number) over feature dimensions (not 0),
  ``x.var(...)``, ``torch.var_mean`` give a *statistic* of ``x`` (plus ``eps``, clamped,
  cast); ``rsqrt`` / ``sqrt`` / ``pow(±0.5)`` of a statistic, and ``x.std(...)``, give a
  *root*. A root that multiplies or divides ``x`` itself (or ``x`` minus its own mean,
  or a dtype copy of ``x``) is a norm: in the backward pass the root is a constant
  (the spec's freeze; the mean subtraction keeps its gradient, or with
  ``keep_norm_mean=False`` the mean is detached too). Roots are wrapped, when computed, in
  an identity whose gradient factor becomes 0 when the division is seen.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from ..ops import scale_grad

__all__ = ["Provenance", "AttentionEvent", "NormEvent", "canonical_name"]


class _Cell:
    """A gradient factor decided after the forward op that uses it ran."""

    __slots__ = ("factor",)

    def __init__(self) -> None:
        self.factor = 1.0


class _Deferred(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``cell.factor`` as it is at backward time
    (0 gives no gradient at all: the input is a constant of the backward pass)."""

    @staticmethod
    def forward(ctx, x: Tensor, cell: _Cell, copy: bool) -> Tensor:  # type: ignore[override]
        ctx.cell = cell
        # a copy where the result is handed back to the model (it may modify it in place);
        # a view where it only feeds one product
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        f = ctx.cell.factor
        if f == 1.0:
            return g, None, None
        if f == 0.0:
            return None, None, None
        return g * f, None, None


def _deferred(x: Tensor, cell: _Cell, copy: bool) -> Tensor:
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _Deferred.apply(x, cell, copy)


@dataclass
class AttentionEvent:
    """One attention softmax that ran: where, and whether its value product was seen."""

    where: Tuple[Any, ...]
    value_product_seen: bool = False


@dataclass
class NormEvent:
    """One root of a statistic that ran (a candidate hand-written norm)."""

    where: Tuple[Any, ...]
    op: str
    cell: _Cell = field(default_factory=_Cell)
    confirmed: bool = False


# tag kinds
_SCORE, _PROBS, _SQ, _SQSUM, _MEAN, _STAT, _ROOT, _CENTERED, _LIN, _ACT = range(10)
#: activations of gated MLPs (SwiGLU, GeGLU, ReGLU, sigmoid GLU)
_GLU_ACTS = {"silu", "gelu", "relu", "sigmoid", "mish", "silu_", "relu_"}
_SPLITS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}


@dataclass
class _Tag:
    const: bool = False
    base: Optional[int] = None  # id of the tensor this is a cast / copy of
    kind: Optional[int] = None
    src: Optional[int] = None  # for norm statistics: base id of the normalised tensor
    data: Any = None  # SCORE: tuple of cells; PROBS: AttentionEvent; ROOT: NormEvent;
    # CENTERED: the keep-mean cell or None


_CONST = _Tag(const=True)

_MATMULS = {"matmul", "__matmul__", "bmm", "mm", "baddbmm", "einsum"}
_CASTS = {
    "to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone",
}
_VIEWS = {
    "view", "reshape", "view_as", "reshape_as", "expand", "expand_as", "unsqueeze",
    "squeeze", "flatten", "unflatten", "transpose", "permute", "t", "__getitem__",
    "movedim", "swapaxes", "narrow", "T", "mT", "H", "mH",
}
_NORM_PASS = _CASTS | _VIEWS
_SQUARES = {"pow", "__pow__", "square", "float_power"}
#: ops that may tag an output although no input carries a tag (everything else, with
#: untagged inputs, takes the fast path: its output is a plain hidden-state tensor)
_FROM_UNTAGGED = _CASTS | _SQUARES | {
    "mul", "__mul__", "multiply", "mean", "nanmean", "var", "std", "var_mean", "std_mean",
    "linear",
}
_ADDS = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "sub_"}
_CLAMPS = {"clamp", "clamp_min", "clip", "clamp_", "clamp_min_", "maximum"}
_MULDIV = {
    "mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "div_",
    "__itruediv__", "divide", "true_divide", "multiply",
}
_DIVS = {"div", "__truediv__", "div_", "__itruediv__", "divide", "true_divide"}
_REDUCTIONS = {
    "sum", "mean", "amax", "max", "amin", "min", "logsumexp", "norm", "var", "std",
    "var_mean", "std_mean", "prod", "argmax", "argmin", "all", "any", "nansum", "nanmean",
}

_ATTR_VIEWS = {"T", "mT", "H", "mH", "data"}
_NAME_OWNERS = ("TensorBase.", "Tensor.", "_VariableFunctionsClass.")
_NAME_MODULES = {
    "torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch.special",
    "torch._C._special", "torch._tensor", "torch._C._linalg", "torch.linalg",
}
_names: Dict[Any, Optional[str]] = {}


def canonical_name(func: Callable[..., Any]) -> Optional[str]:
    """The name of a torch function as the detector knows it (``F.softmax``,
    ``torch.softmax`` and ``Tensor.softmax`` are all ``"softmax"``); None for what it
    never looks at (attribute getters, foreign functions)."""
    try:
        return _names[func]
    except KeyError:
        pass
    except TypeError:  # unhashable
        return None
    name = getattr(func, "__name__", None)
    if name == "__get__":  # attribute views: x.T, x.mT (shape, dtype...: not looked at)
        attr = getattr(getattr(func, "__self__", None), "__name__", None)
        out = attr if attr in _ATTR_VIEWS else None
        _names[func] = out
        return out
    qual = getattr(func, "__qualname__", "") or ""
    mod = getattr(func, "__module__", None)
    ok = isinstance(name, str) and name != "__get__" and (
        qual.startswith(_NAME_OWNERS) or mod in _NAME_MODULES
    )
    out = name if ok else None
    _names[func] = out
    return out


def _tensors(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[Tensor]:
    out: List[Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, Tensor))
    return out


def _trailing(dim: Any, ndim: int) -> bool:
    """``dim`` names feature dimension(s) of an ``ndim``-dimensional tensor: given
    explicitly, and never the batch dimension 0 (so ``x.std(0)``, a batch statistic, is
    not a norm; channels-first ``x.mean(1)`` is)."""
    if dim is None or ndim == 0:
        return False
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims or not all(isinstance(d, int) for d in dims):
        return False
    norm = {d % ndim for d in dims}
    return ndim == 1 or 0 not in norm


def _reduce_dim(args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    if "dim" in kwargs:
        return kwargs["dim"]
    if len(args) > 1 and not isinstance(args[1], bool):
        return args[1]
    return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Provenance:
    r"""The tags of the tensors of one forward pass, and the detector's decisions.

    Args:
        const_ids: ids of the model's parameters and buffers.
        where: returns where the forward pass is now (recorded with each event).
    """

    def __init__(self, const_ids: Set[int], where: Callable[[], Any]) -> None:
        self.const_ids = const_ids
        self.where = where
        self._tags: Dict[int, Tuple["weakref.ref[Tensor]", _Tag]] = {}
        self.attention: List[AttentionEvent] = []
        self.norms: List[NormEvent] = []
        self.gated: List[Any] = []  # where each gated product ran
        self.freeze = True

    # -- the map -----------------------------------------------------------------------

    def tag(self, t: Any) -> Optional[_Tag]:
        if not isinstance(t, Tensor):
            return None
        i = id(t)
        if i in self.const_ids:
            return _CONST
        e = self._tags.get(i)
        if e is None or e[0]() is not t:
            return None
        return e[1]

    def set_tag(self, t: Tensor, tag: Optional[_Tag]) -> None:
        i = id(t)
        if tag is None:
            self._tags.pop(i, None)
        else:
            self._tags[i] = (weakref.ref(t), tag)

    def is_const(self, t: Any) -> bool:
        tg = self.tag(t)
        return tg is not None and tg.const

    def base(self, t: Tensor) -> int:
        tg = self.tag(t)
        return tg.base if tg is not None and tg.base is not None else id(t)

    def score_cells(self, t: Any) -> Optional[Tuple[_Cell, ...]]:
        """The deferred cells of the score products ``t`` descends from, or None if ``t``
        is not attention scores."""
        tg = self.tag(t)
        return tg.data if tg is not None and tg.kind == _SCORE else None

    def mark_probs(self, t: Tensor, event: AttentionEvent) -> None:
        self.attention.append(event)
        self.set_tag(t, _Tag(kind=_PROBS, data=event))

    def clear(self) -> None:
        self._tags.clear()

    # -- one op ------------------------------------------------------------------------

    def run(
        self, name: str, func: Callable[..., Any], args: Tuple[Any, ...],
        kwargs: Dict[str, Any], divide: bool, freeze: bool, keep_mean: bool,
    ) -> Any:
        """Compute ``func(*args, **kwargs)`` (operands possibly wrapped) and tag the result."""
        self.freeze = freeze
        if name in _MATMULS:
            return self._matmul(name, func, args, kwargs, divide)
        if name not in _FROM_UNTAGGED:
            fast = self._untagged(args, kwargs)
            if fast is not None:
                out = func(*args, **kwargs)
                if isinstance(out, Tensor):
                    if fast:
                        self._tags[id(out)] = (weakref.ref(out), _CONST)
                    else:
                        self._tags.pop(id(out), None)
                    return out
                if not isinstance(out, (tuple, list)):
                    return out
                return self._tag_many(name, args, kwargs, out, _tensors(args, kwargs))
        if name in ("sub", "__sub__") and freeze and not keep_mean and len(args) == 2 \
                and isinstance(args[0], Tensor):
            m = self.tag(args[1])
            if m is not None and m.kind == _MEAN and m.src == self.base(args[0]):
                cell = _Cell()  # becomes 0 (mean detached) when the norm is confirmed
                out = func(args[0], _deferred(args[1], cell, False), **kwargs)
                self.set_tag(out, _Tag(kind=_CENTERED, src=m.src, data=cell))
                return out
        if name in ("mul", "__mul__", "multiply") and len(args) == 2:
            tags = [self.tag(a) for a in args]
            kinds = {getattr(t, "kind", None) for t in tags}
            # act(gate(x)) * up(x), both projections of the same x: both branches x1/2 (not a
            # gate times some other path, e.g. Qwen2-MoE's sigmoid-gated shared expert)
            if kinds == {_LIN, _ACT} and tags[0].src is not None and tags[0].src == tags[1].src:
                self.gated.append(self.where())
                f = 0.5 if divide else 1.0
                return func(scale_grad(args[0], f), scale_grad(args[1], f), **kwargs)
        out = func(*args, **kwargs)
        ins = _tensors(args, kwargs)
        if isinstance(out, Tensor):
            tag = self._branch_tag(name, args, ins)
            if tag is None:
                tag = self._norm_tag(name, args, kwargs, ins)
            if tag is None:
                tag = self._generic_tag(name, ins, out)
            elif tag.kind == _ROOT and isinstance(tag.data, str):
                out, tag = self._new_root(out, tag)
            self.set_tag(out, tag)
        elif isinstance(out, (tuple, list)):
            out = self._tag_many(name, args, kwargs, out, ins)
        return out

    def _branch_tag(self, name: str, args: Tuple[Any, ...], ins: List[Tensor]) -> Optional[_Tag]:
        """Gated-MLP branches: a linear map of a hidden state (``_LIN``), an activation of
        one (``_ACT``), followed through views."""
        if not ins:
            return None
        if name == "linear" and len(ins) >= 2:
            x, w = ins[0], ins[1]
            if self.is_const(w) and not self.is_const(x):
                return _Tag(kind=_LIN, src=self.base(x))  # src: what was projected
            return None
        tx = self.tag(args[0]) if args else None
        kind = tx.kind if tx is not None else None
        if kind == _LIN and name in _GLU_ACTS:
            return _Tag(kind=_ACT, src=tx.src)
        if kind in (_LIN, _ACT) and name in _VIEWS:
            return _Tag(kind=kind, src=tx.src)
        return None

    def _untagged(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[bool]:
        """None if some tensor input carries a tag other than "constant" (or sits in a
        list); else whether every tensor input is a constant."""
        tags, cids = self._tags, self.const_ids
        all_const = True
        for a in args if not kwargs else (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                i = id(a)
                if i in cids:
                    continue
                e = tags.get(i)
                if e is not None and e[0]() is a:
                    if e[1] is _CONST or e[1].const:
                        continue
                    return None
                all_const = False
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
                return None
        return all_const

    def _new_root(self, out: Tensor, tag: _Tag) -> Tuple[Tensor, _Tag]:
        """A root of a statistic: wrapped so that it can become a backward constant."""
        ev = NormEvent(self.where(), tag.data)
        self.norms.append(ev)
        return _deferred(out, ev.cell, True), _Tag(kind=_ROOT, src=tag.src, data=ev)

    def _generic_tag(self, name: str, ins: List[Tensor], out: Tensor) -> Optional[_Tag]:
        tags = [self.tag(t) for t in ins]
        if all(t is not None and t.const for t in tags):
            return _CONST
        if name in _REDUCTIONS:
            return None
        # scores and weights survive every op that keeps (at least) their size
        for t, tg in zip(ins, tags):
            if tg is not None and tg.kind in (_SCORE, _PROBS) and out.dim() >= 1 \
                    and out.numel() >= t.numel():
                if tg.kind == _PROBS:
                    return tg
                cells: Tuple[_Cell, ...] = ()
                for t2 in tags:
                    if t2 is not None and t2.kind == _SCORE:
                        cells += tuple(c for c in t2.data if c not in cells)
                return _Tag(kind=_SCORE, data=cells)
        if name in _CASTS and ins:
            return _Tag(base=self.base(ins[0]))
        return None

    def _src(self, x: Tensor, tx: Optional[_Tag]) -> int:
        """The tensor a statistic of ``x`` is a statistic of (``x - mean(x)``: ``x``)."""
        return tx.src if tx is not None and tx.kind == _CENTERED else self.base(x)

    def _norm_tag(
        self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any], ins: List[Tensor]
    ) -> Optional[_Tag]:
        if not ins:
            return None
        x = args[0] if args and isinstance(args[0], Tensor) else ins[0]
        tx = self.tag(x)
        if tx is not None and tx.const:
            return None
        kind = tx.kind if tx is not None else None
        if kind in (_LIN, _ACT):
            kind = None
        second = args[1] if len(args) > 1 else None
        if kind in (_SQ, _SQSUM, _MEAN, _STAT, _ROOT, _CENTERED) and name in _NORM_PASS:
            return _Tag(kind=kind, src=tx.src, data=tx.data,
                        base=self.base(x) if name in _CASTS else None)
        # x ** 2, x * x
        if kind not in (_STAT, _ROOT, _SQ, _SQSUM) and (
            name == "square"
            or (name in _SQUARES and kwargs.get("exponent", second) == 2)
            or (name in ("mul", "__mul__", "multiply") and len(args) == 2 and args[0] is args[1])
        ):
            return _Tag(kind=_SQ, src=self._src(x, tx))
        if name in ("mean", "nanmean", "sum", "nansum", "var", "std"):
            if not _trailing(_reduce_dim(args, kwargs), x.dim()):
                return None
            if name == "var":
                return _Tag(kind=_STAT, src=self._src(x, tx))
            if name == "std":
                return _Tag(kind=_ROOT, src=self._src(x, tx), data="std")
            if kind == _SQ:
                return _Tag(kind=_STAT if name in ("mean", "nanmean") else _SQSUM, src=tx.src)
            if kind is None and name in ("mean", "nanmean"):
                return _Tag(kind=_MEAN, src=self.base(x))
            return None
        # the statistic: + eps, clamped, a sum divided by the count; then its root
        if kind in (_STAT, _SQSUM):
            small = second is None or _number(second) or self.is_const(second)
            if (name in _ADDS or name in _CLAMPS) and small:
                return _Tag(kind=kind, src=tx.src)
            if kind == _SQSUM and name in _DIVS and _number(second):
                return _Tag(kind=_STAT, src=tx.src)
            if kind == _STAT and name in ("rsqrt", "sqrt"):
                return _Tag(kind=_ROOT, src=tx.src, data=f"{name}(mean of squares or variance)")
            if kind == _STAT and name in _SQUARES and kwargs.get("exponent", second) in (0.5, -0.5):
                return _Tag(kind=_ROOT, src=tx.src, data="pow(mean of squares or variance, 0.5)")
            return None
        if kind == _ROOT and (
            name in ("reciprocal", "__rdiv__", "__rtruediv__")
            or (name in _ADDS and (_number(second) or self.is_const(second)))
            or name in _CLAMPS
        ):
            return _Tag(kind=_ROOT, src=tx.src, data=tx.data)
        # x / root, x * root, (x - mean) / root: a norm
        if name in _MULDIV and len(ins) == 2:
            for r, y in ((ins[0], ins[1]), (ins[1], ins[0])):
                tr = self.tag(r)
                if tr is None or tr.kind != _ROOT or not isinstance(tr.data, NormEvent):
                    continue
                ty = self.tag(y)
                if self._src(y, ty) == tr.src:
                    ev: NormEvent = tr.data
                    ev.confirmed = True
                    if self.freeze:
                        ev.cell.factor = 0.0
                        if ty is not None and ty.kind == _CENTERED and ty.data is not None:
                            ty.data.factor = 0.0
                    return None
        if name in ("sub", "__sub__") and len(args) == 2 and isinstance(second, Tensor):
            m = self.tag(second)
            if m is not None and m.kind == _MEAN and m.src == self.base(x):
                return _Tag(kind=_CENTERED, src=m.src)
        return None

    def _tag_many(
        self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any,
        ins: List[Tensor],
    ) -> Any:
        if all(self.is_const(t) for t in ins):
            for o in out:
                if isinstance(o, Tensor):
                    self.set_tag(o, _CONST)
            return out
        if name in ("var_mean", "std_mean") and len(out) == 2 and ins \
                and _trailing(_reduce_dim(args, kwargs), ins[0].dim()):
            x = ins[0]
            src = self._src(x, self.tag(x))
            first, mean = out
            tag = _Tag(kind=_STAT, src=src)
            if name == "std_mean":
                first, tag = self._new_root(first, _Tag(kind=_ROOT, src=src, data="std_mean"))
            self.set_tag(first, tag)
            self.set_tag(mean, _Tag(kind=_MEAN, src=self.base(x)))
            return (first, mean)
        if name in _SPLITS and args and getattr(self.tag(args[0]), "kind", None) == _LIN:
            src = self.tag(args[0]).src
            for o in out:  # a fused gate_up projection, chunked
                if isinstance(o, Tensor):
                    self.set_tag(o, _Tag(kind=_LIN, src=src))
            return out
        for o in out:
            if isinstance(o, Tensor):
                tg = self._generic_tag(name, ins, o)
                if tg is not None and tg.kind in (_SCORE, _PROBS):
                    self.set_tag(o, tg)
        return out

    # -- products ----------------------------------------------------------------------

    def _matmul(
        self, name: str, func: Callable[..., Any], args: Tuple[Any, ...],
        kwargs: Dict[str, Any], divide: bool,
    ) -> Any:
        rebuild: Callable[[Tensor, Tensor], Tuple[Any, ...]]
        if name == "einsum":
            if len(args) == 2 and isinstance(args[1], (list, tuple)):
                ops = list(args[1])
            else:
                ops = list(args[1:])
            eq = args[0]
            rebuild = lambda a, b: (eq, a, b)  # noqa: E731
        elif name == "baddbmm":
            if "batch1" in kwargs or "batch2" in kwargs:  # bias.baddbmm(batch1=q, batch2=k)
                kw = dict(kwargs)
                a0, b0 = kw.pop("batch1", None), kw.pop("batch2", None)
                if len(args) != 1 or not isinstance(a0, Tensor) or not isinstance(b0, Tensor):
                    return self._plain(func, args, kwargs)
                bias = args[0]
                kwargs = kw
                ops = [a0, b0]
                rebuild = lambda a, b: (bias, a, b)  # noqa: E731
            else:
                ops = list(args[1:3])
                rest = args[3:]
                rebuild = lambda a, b: (args[0], a, b, *rest)  # noqa: E731
        else:
            ops = list(args[:2])
            rest = args[2:]
            rebuild = lambda a, b: (a, b, *rest)  # noqa: E731
        if len(ops) != 2 or not all(isinstance(o, Tensor) for o in ops):
            return self._plain(func, args, kwargs)
        a, b = ops
        ta, tb = self.tag(a), self.tag(b)
        pa = ta is not None and ta.kind == _PROBS
        pb = tb is not None and tb.kind == _PROBS
        if pa != pb:  # attention weights times values: v x1/2, the weights' gradient as is
            ev: AttentionEvent = (ta if pa else tb).data  # type: ignore[union-attr]
            ev.value_product_seen = True
            f = 0.5 if divide else 1.0
            new = rebuild(a, scale_grad(b, f)) if pa else rebuild(scale_grad(a, f), b)
            return func(*new, **kwargs)
        ca, cb = ta is not None and ta.const, tb is not None and tb.const
        if ca or cb:  # a weight matrix: a linear map (both constant: a constant)
            out = func(*args, **kwargs)
            if isinstance(out, Tensor):
                hidden = b if ca else a  # the projected tensor
                self.set_tag(out, _CONST if ca and cb else _Tag(kind=_LIN, src=self.base(hidden)))
            return out
        # two hidden-state operands: attention scores if a softmax takes them; the operands'
        # gradient factor (1/4 for q and k) is decided there
        cell = _Cell()
        if divide:
            out = func(*rebuild(_deferred(a, cell, False), _deferred(b, cell, False)), **kwargs)
        else:
            out = func(*args, **kwargs)
        if isinstance(out, Tensor):
            self.set_tag(out, _Tag(kind=_SCORE, data=(cell,)))
        return out

    def _plain(self, func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        out = func(*args, **kwargs)
        if isinstance(out, Tensor):
            const = all(self.is_const(t) for t in _tensors(args, kwargs))
            self.set_tag(out, _CONST if const else None)
        return out
