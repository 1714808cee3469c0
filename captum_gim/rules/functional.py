r"""GIM for any PyTorch model, by what its forward pass computes.

:func:`install_functional` hooks a model's root module. While ``get_active()`` returns a
scope (it reads a ContextVar: other threads and tasks are untouched), each call of the
root's forward with autograd on runs inside a :class:`~torch.overrides.TorchFunctionMode`
entered by the pre-hook and left by the forward hook (``always_call=True``, also when
the forward raises). Other models, and this one outside a scope, see no mode at all.

Inside the mode, these functions get GIM's backward pass wherever they are called from
(forward values are unchanged, bit for bit):

- ``F.scaled_dot_product_attention``: :func:`captum_gim.ops.gim_attention` (TSG on the
  attention probabilities at temperature ``T``, q and k x1/4, v x1/2; boolean and
  additive masks with broadcasting, ``is_causal``, ``scale=``, ``enable_gqa``).
  ``dropout_p > 0`` is refused (its dropout mask cannot be reproduced).
- ``F.layer_norm`` / ``torch.layer_norm``: frozen standard deviation
  (:func:`~captum_gim.ops.frozen_layer_norm`; the mean keeps its gradient unless
  ``keep_norm_mean=False``); ``F.rms_norm`` / ``torch.rms_norm``: frozen ``1/rms``.
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention`` subclasses with their own
  ``forward``, direct callers): the torch.nn rule's GIM multi-head attention.
- explicit softmax attention and hand-written norms, found by what they compute
  (:mod:`captum_gim.rules.functional_detect`): a softmax of a product of two hidden-state
  tensors gets TSG, the product's operands x1/4 and the value product's value x1/2; the
  ``rsqrt`` / ``sqrt`` of a mean of squares or a variance that divides the tensor it was
  computed from is a constant of the backward pass; ``act(linear(x)) * linear(x)`` (gated
  MLPs) halves the gradient of both branches.

Module rules take precedence: whatever runs while
:func:`captum_gim._coverage.current_rule` names a rule is left alone and recorded as
covered by that rule. Every normalisation and attention softmax that ran is recorded on
the scope (``scope.record(path, class_name, op, cover)``) with its cover:
``"rule:<name>"``, ``"functional:<op>"``, ``"ignored:<Class>"`` (a class the scope's
registry ignores), ``"not-attention"`` (a softmax of something that is not attention
scores: routers, output heads) or ``"none"``. With ``scope.strict`` an op left at
``"none"`` makes the root forward raise :class:`~captum_gim.errors.UncoveredOperationError`
before it returns anything; otherwise one
:class:`~captum_gim.errors.UncoveredOperationWarning` names them.

Limits (also in ``docs/any_model.rst``): ``torch.compile``-d models are refused (the mode
cannot be traced); a forward interrupted by a ``BaseException`` that is not an
``Exception`` (``KeyboardInterrupt``) leaves the mode until the next call of the same
root in that thread, which removes it; recomputation by gradient checkpointing happens
outside the forward pass and is not covered.
"""

from __future__ import annotations

import inspect
import sys
import threading
from contextvars import Token
from dataclasses import dataclass, field
from types import FrameType, SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._coverage import current_rule
from ..config import GIMConfig
from ..ops import frozen_layer_norm, frozen_rms_norm, gim_attention, tsg_softmax
from ..registry import Handle
from .functional_detect import AttentionEvent, Provenance, canonical_name
from .functional_report import Entry as _Entry
from .functional_report import Where as _Where
from .functional_report import STATE as _STATE
from .functional_report import acquire_global_hooks as _acquire_global_hooks
from .functional_report import release_global_hooks as _release_global_hooks
from .functional_report import report as _report
from .torch_nn import gim_multihead_attention_forward

__all__ = ["install_functional", "ActiveScopeLike", "COVERED_OPS"]


class ActiveScopeLike(Protocol):
    """What :func:`install_functional` needs from the scope ``get_active`` returns."""

    config: GIMConfig
    strict: bool

    def record(self, path: str, class_name: str, op: str, cover: str) -> None: ...


#: torch functions given GIM's backward by name (canonical names, see
#: :func:`~captum_gim.rules.functional_detect.canonical_name`)
COVERED_OPS = (
    "scaled_dot_product_attention", "layer_norm", "rms_norm",
    "multi_head_attention_forward", "softmax",
)

#: ops that must not run with autograd off inside a forward pass that started with it on
_NEED_GRAD = frozenset(
    ("scaled_dot_product_attention", "layer_norm", "rms_norm", "multi_head_attention_forward")
)



@dataclass
class _Frame:
    root: nn.Module
    key: object
    scope: Any
    exc: Optional[BaseException]
    grad: bool = True  # autograd was on when this root's forward began


class _Mode(TorchFunctionMode):
    """The mode one call of a root forward runs in; all decisions are the state's."""

    def __init__(self, state: "_CallState") -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if kwargs is None:
            kwargs = {}
        name = canonical_name(func)
        if name is None:
            return func(*args, **kwargs)
        return self.state.dispatch(name, func, args, kwargs)


@dataclass
class _CallState:
    """Everything one outermost root call (and the root calls nested in it) shares."""

    thread: int
    owner: Optional[FrameType]
    frames: List[_Frame] = field(default_factory=list)
    path: List[Tuple[object, str, nn.Module]] = field(default_factory=list)
    #: id(module) -> [(install key, module path under that install's root)]
    names: Dict[int, List[Tuple[object, str]]] = field(default_factory=dict)
    hooks_held: bool = False
    entries: List[_Entry] = field(default_factory=list)
    const_ids: Set[int] = field(default_factory=set)
    token: Optional[Token] = None
    mode: Optional[_Mode] = None
    prov: Provenance = field(init=False)

    def __post_init__(self) -> None:
        self.prov = Provenance(self.const_ids, self.where)

    # -- where are we ------------------------------------------------------------------

    def scope_frame(self) -> _Frame:
        for f in reversed(self.frames):
            if f.scope is not None:
                return f
        return self.frames[0]

    def where(self) -> _Where:
        frame = self.scope_frame()
        scope = frame.scope
        entry = next((e for e in reversed(self.path) if e[0] is frame.key), None)
        if entry is None and self.path:
            entry = self.path[-1]
        path, module = (entry[1], entry[2]) if entry else ("", frame.root)
        ignored = None
        registry = getattr(scope, "registry", None)
        if registry is not None and getattr(registry, "_ignored", None):
            for _k, _n, m in reversed(self.path):
                if registry._is_ignored(m):
                    ignored = type(m).__name__
                    break
        return _Where(path, type(module).__name__, scope, ignored)

    def config(self) -> GIMConfig:
        return self.scope_frame().scope.config

    def note(self, op: str, cover: str, reason: str = "", where: Optional[_Where] = None) -> None:
        w = where or self.where()
        if cover == "none" and w.ignored:
            cover = f"ignored:{w.ignored}"
        self.entries.append(_Entry(w, op, cover, reason))

    # -- one torch function ------------------------------------------------------------

    def dispatch(self, name: str, func: Callable[..., Any], args: Tuple[Any, ...],
                 kwargs: Dict[str, Any]) -> Any:
        rule = current_rule()
        if rule is not None:
            if name in COVERED_OPS:
                self.note(name, f"rule:{rule}")
            return func(*args, **kwargs)
        if not torch.is_grad_enabled():
            if name in _NEED_GRAD and self.frames[0].grad:
                self.note(name, "none", reason="ran with autograd off inside a forward pass run "
                          "with it on, so GIM cannot reach its backward (torch.utils.checkpoint "
                          "with use_reentrant=True recomputes it later, plainly); use "
                          "use_reentrant=False or no checkpointing")
            return func(*args, **kwargs)
        handler = _HANDLERS.get(name)
        if handler is not None:
            return handler(self, func, args, kwargs)
        cfg = self.scope_frame().scope.config
        return self.prov.run(
            name, func, args, kwargs, cfg.divide_grads, cfg.freeze_norms, cfg.keep_norm_mean
        )

    # -- the end of the outermost call ---------------------------------------------------

    def finish(self) -> List[_Entry]:
        """Settle the deferred decisions and return every entry of this call."""
        for ev in self.prov.attention:
            w: _Where = ev.where
            if ev.value_product_seen or not w.scope.config.divide_grads:
                self.note("attention softmax", "functional:attention-softmax", where=w)
            else:
                self.note(
                    "attention softmax", "none", where=w,
                    reason="TSG and q/k x1/4 applied, but the product of these attention "
                    "weights with the values (a matmul, bmm or einsum with a hidden-state "
                    "tensor) was not found, so the value gradient is not halved",
                )
        for nv in self.prov.norms:
            if nv.confirmed:
                self.note(nv.op, "functional:hand-written-norm", where=nv.where)
            else:
                self.note(
                    nv.op, "none", where=nv.where,
                    reason="a root of a mean of squares or a variance that does not multiply "
                    "or divide the tensor it was computed from, so it is left unfrozen",
                )
        for w in self.prov.gated:
            self.note("gated product", "functional:gated-mlp", where=w)
        self.prov.clear()
        return self.entries


# -- the covers ------------------------------------------------------------------------


def _arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _layer_norm(st: _CallState, func, args, kwargs) -> Tensor:
    cfg = st.config()
    st.note("layer_norm", "functional:layer_norm")
    if not cfg.freeze_norms:
        return func(*args, **kwargs)
    x = _arg(args, kwargs, 0, "input", None)
    shape = _arg(args, kwargs, 1, "normalized_shape", None)
    w = _arg(args, kwargs, 2, "weight", None)
    b = _arg(args, kwargs, 3, "bias", None)
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    return frozen_layer_norm(x, shape, w, b, eps, keep_mean=cfg.keep_norm_mean)


def _rms_norm(st: _CallState, func, args, kwargs) -> Tensor:
    cfg = st.config()
    st.note("rms_norm", "functional:rms_norm")
    if not cfg.freeze_norms:
        return func(*args, **kwargs)
    x = _arg(args, kwargs, 0, "input", None)
    shape = _arg(args, kwargs, 1, "normalized_shape", None)
    w = _arg(args, kwargs, 2, "weight", None)
    eps = _arg(args, kwargs, 3, "eps", None)
    return frozen_rms_norm(x, shape, w, eps)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def _sdpa(st: _CallState, func, args, kwargs) -> Tensor:
    cfg = st.config()
    op = "scaled_dot_product_attention"
    unknown = set(kwargs) - set(_SDPA_ARGS)
    if unknown or len(args) > len(_SDPA_ARGS):
        st.note(op, "none", reason=f"unknown arguments {sorted(unknown)}")
        return func(*args, **kwargs)
    a = dict(zip(_SDPA_ARGS, _SDPA_DEFAULTS))
    a.update(zip(_SDPA_ARGS, args))
    a.update(kwargs)
    if a["dropout_p"]:
        st.note(op, "none", reason=f"dropout_p={a['dropout_p']}: attention dropout is on "
                "(training); GIM needs the model in eval mode or dropout 0")
        return func(*args, **kwargs)
    st.note(op, f"functional:{op}")
    if not (cfg.uses_tsg or cfg.divide_grads):
        return func(*args, **kwargs)
    return gim_attention(
        a["query"], a["key"], a["value"], a["attn_mask"], 0.0, bool(a["is_causal"]),
        a["scale"], bool(a["enable_gqa"]), temperature=cfg.temperature,
        divide_grads=cfg.divide_grads,
    )


_MHA_SIG = inspect.signature(F.multi_head_attention_forward)


def _mha(st: _CallState, func, args, kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    cfg = st.config()
    op = "multi_head_attention_forward"
    a = _MHA_SIG.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    if p["static_k"] is not None or p["static_v"] is not None:
        st.note(op, "none", reason="static_k / static_v are not supported")
        return func(*args, **kwargs)
    if p["training"] and p["dropout_p"] > 0.0:
        st.note(op, "none", reason=f"dropout_p={p['dropout_p']} in training: GIM needs the "
                "model in eval mode or dropout 0")
        return func(*args, **kwargs)
    st.note(op, f"functional:{op}")
    if cfg.is_identity:
        return func(*args, **kwargs)
    m = SimpleNamespace(
        batch_first=False, num_heads=p["num_heads"], embed_dim=p["embed_dim_to_check"],
        _qkv_same_embed_dim=not p["use_separate_proj_weight"],
        in_proj_weight=p["in_proj_weight"], in_proj_bias=p["in_proj_bias"],
        q_proj_weight=p["q_proj_weight"], k_proj_weight=p["k_proj_weight"],
        v_proj_weight=p["v_proj_weight"], bias_k=p["bias_k"], bias_v=p["bias_v"],
        add_zero_attn=p["add_zero_attn"], training=p["training"], dropout=p["dropout_p"],
        out_proj=SimpleNamespace(weight=p["out_proj_weight"], bias=p["out_proj_bias"]),
    )
    return gim_multihead_attention_forward(
        m, cfg, p["query"], p["key"], p["value"], p["key_padding_mask"], p["need_weights"],
        p["attn_mask"], p["average_attn_weights"], p["is_causal"],
    )


def _softmax(st: _CallState, func, args, kwargs) -> Tensor:
    z = _arg(args, kwargs, 0, "input", None)
    cells = st.prov.score_cells(z)
    if cells is None:
        out = func(*args, **kwargs)
        st.note("softmax", "not-attention")
        st.prov.set_tag(out, None)
        return out
    if func is F.softmax:
        dim = _arg(args, kwargs, 1, "dim", None)
        dtype = _arg(args, kwargs, 3, "dtype", None)
        if dim is None:
            dim = F._get_softmax_dim("softmax", z.dim(), 3)
    else:
        dim = _arg(args, kwargs, 1, "dim", None)
        dtype = _arg(args, kwargs, 2, "dtype", None)
    cfg = st.config()
    for c in cells:
        c.factor = 0.25 if cfg.divide_grads else 1.0
    out = tsg_softmax(z, dim=dim, temperature=cfg.temperature, dtype=dtype)
    st.prov.mark_probs(out, AttentionEvent(st.where()))
    return out


def _written_softmax(st: _CallState, func, args, kwargs) -> Tensor:
    z = args[0] if args else None
    out = func(*args, **kwargs)
    if st.prov.score_cells(z) is not None:
        name = canonical_name(func)
        st.note(f"{name} of attention scores", "none",
                reason="a softmax written out (exp / log_softmax of attention scores) cannot "
                "be given TSG; call torch.softmax on the scores")
    st.prov.set_tag(out, None)
    return out


_HANDLERS: Dict[str, Callable[..., Any]] = {
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "scaled_dot_product_attention": _sdpa,
    "multi_head_attention_forward": _mha,
    "softmax": _softmax,
    "exp": _written_softmax,
    "exp_": _written_softmax,
    "log_softmax": _written_softmax,
}


# -- entering and leaving ----------------------------------------------------------------


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch-function mode stack, wherever it is."""
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    if mode not in stack:
        return
    above: List[Any] = []
    while True:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


_CALL_IMPL = nn.Module._call_impl.__code__


def _owner() -> Optional[FrameType]:
    """The frame of the ``nn.Module._call_impl`` running the root forward now."""
    f: Optional[FrameType] = sys._getframe(1)
    while f is not None and f.f_code is not _CALL_IMPL:
        f = f.f_back
    return f


def _alive(frame: Optional[FrameType]) -> bool:
    """Whether ``frame`` is still executing (is on the current call stack)."""
    if frame is None:
        return True
    f: Optional[FrameType] = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


def _close(st: _CallState) -> None:
    if st.hooks_held:
        _release_global_hooks()
        st.hooks_held = False
    if st.mode is not None:
        _remove_mode(st.mode)
        st.mode = None
    if st.token is not None:
        try:
            _STATE.reset(st.token)
        except ValueError:  # a different context: leave it to that one
            _STATE.set(None)
        st.token = None


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover - very old torch
        return False


def _is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


_COMPILE_MSG = (
    "GIM cannot modify the backward pass of a torch.compile'd model ({}): the function-level "
    "rules run in a TorchFunctionMode that compiled graphs bypass. Attribute the original "
    "module instead (model._orig_mod, or the model before torch.compile)."
)


def _pre_hook(key: object, get_active: Callable[[], Any], module: nn.Module, args: Any) -> None:
    st = _STATE.get()
    if st is not None and (st.thread != threading.get_ident() or not st.frames or not _alive(st.owner)):
        _close(st)  # left behind by a forward interrupted by a BaseException, or another thread's
        st = None
        _STATE.set(None)
    scope = get_active()
    if st is None and (scope is None or not torch.is_grad_enabled()):
        # no scope, or no autograd (nothing to cover): no mode, so every forward path
        # (e.g. nn.TransformerEncoderLayer's fused inference path) stays as it is
        return
    if scope is not None and (_compiling() or _is_compiled(module)):
        raise RuntimeError(_COMPILE_MSG.format(type(module).__name__))
    if st is None:
        st = _CallState(thread=threading.get_ident(), owner=_owner())
        st.token = _STATE.set(st)
        _acquire_global_hooks()
        st.hooks_held = True
        st.mode = _Mode(st)
        st.mode.__enter__()
    for name, m in module.named_modules():
        st.names.setdefault(id(m), []).append((key, name))
    st.const_ids.update(id(p) for p in module.parameters())
    st.const_ids.update(id(b) for b in module.buffers())
    st.frames.append(_Frame(module, key, scope, sys.exc_info()[1], torch.is_grad_enabled()))
    st.path.append((key, "", module))


def _post_hook(key: object, module: nn.Module, args: Any, kwargs: Any, result: Any) -> None:
    st = _STATE.get()
    if st is None or not st.frames:
        return
    frame = st.frames[-1]
    if frame.root is not module or frame.key is not key:
        return
    st.frames.pop()
    for i in range(len(st.path) - 1, -1, -1):
        if st.path[i][0] is key and st.path[i][2] is module:
            del st.path[i:]
            break
    if st.frames:
        return
    failed = sys.exc_info()[1] is not None and sys.exc_info()[1] is not frame.exc
    _close(st)
    st.frames.append(frame)  # where() of the settled events needs a frame
    entries = st.finish()
    st.frames.clear()
    _report(module, entries, raise_errors=not failed)


# -- the entry point -----------------------------------------------------------------------


def install_functional(
    model: nn.Module, get_active: Callable[[], Optional[ActiveScopeLike]]
) -> Handle:
    r"""Give ``model`` function-level GIM while ``get_active()`` returns a scope.

    Registers a forward pre-hook and a forward hook on the root module; nothing else is
    changed (while a root forward runs in the mode, process-wide module hooks keep the
    module path for reports, and are removed when it ends). The handle removes both hooks.

    Args:
        model (nn.Module): the root module.
        get_active (Callable[[], Optional[ActiveScopeLike]]): called at the start of each
            root forward; returns the scope in force for this model in the calling context
            (with ``config``, ``strict``, ``record``, optionally ``registry``), or None for
            the plain forward pass.

    Returns:
        Handle: ``remove()`` takes every hook off again (idempotent).

    Raises:
        RuntimeError: (at forward time, inside a scope) ``model`` is ``torch.compile``-d.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"install_functional needs an nn.Module, got {type(model).__name__}")
    key = object()
    handles = [
        model.register_forward_pre_hook(_bind(_pre_hook, key, get_active)),
        model.register_forward_hook(
            _bind(_post_hook, key), with_kwargs=True, always_call=True, prepend=True
        ),
    ]
    def undo() -> None:
        for h in handles:
            h.remove()

    return Handle(undo)


def _bind(fn: Callable[..., Any], *bound: Any) -> Callable[..., Any]:
    def hook(*args: Any, **kwargs: Any) -> Any:
        return fn(*bound, *args, **kwargs)

    return hook
