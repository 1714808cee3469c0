r"""Small, backend-independent plots of attributions over time (visits).

Captum's ``captum.attr.visualization.visualize_timeseries_attr`` crashes on
matplotlib >= 3.9; :func:`plot_timeseries_attributions` draws the same kind of picture
(attributions of each feature at each visit or time step) with nothing but
``matplotlib.figure.Figure``, so it works under any backend, Agg included, and never opens
a window. It depends on matplotlib only (no PyHealth), so it can move to
``captum_gim.viz`` as is.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["plot_timeseries_attributions"]


def _as_2d(x: Union[Tensor, Any]) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    if t.dim() != 2:
        raise ValueError(
            "plot_timeseries_attributions takes one patient's attributions shaped "
            f"(time steps,) or (time steps, features); got shape {tuple(t.shape)}. "
            "Index the batch first, e.g. attributions['labs'][0]."
        )
    return t


def plot_timeseries_attributions(
    attributions: Union[Tensor, Any],
    *,
    feature_names: Optional[Sequence[str]] = None,
    time_labels: Optional[Sequence[Any]] = None,
    values: Optional[Union[Tensor, Any]] = None,
    mask: Optional[Union[Tensor, Any]] = None,
    ax: Optional[Any] = None,
    title: Optional[str] = None,
    cmap: str = "RdBu_r",
    value_format: str = "{:.2g}",
) -> Any:
    r"""Heat map of one patient's attributions: time steps (visits) on x, features on y.

    Colours are symmetric around zero (red: pushes the target up, blue: down, with the
    default colour map). Padded time steps can be hidden with ``mask``; raw values can be
    written into the cells with ``values``.

    Args:
        attributions (Tensor or array): shaped ``(T,)`` or ``(T, F)`` for one patient
            (``T`` time steps or visits, ``F`` features).
        feature_names (sequence of str, optional): ``F`` labels for the y axis.
        time_labels (sequence, optional): ``T`` labels for the x axis (visit dates, hours).
        values (Tensor or array, optional): the raw inputs, same shape; written in the cells.
        mask (Tensor or array, optional): ``(T,)``, true for real (not padded) time steps;
            padded steps are dropped from the plot.
        ax (matplotlib Axes, optional): where to draw. Default: a new
            ``matplotlib.figure.Figure`` (no pyplot, no window), reachable as ``ax.figure``.
        title (str, optional): the axes title.
        cmap (str): a matplotlib colour map name. Default: ``"RdBu_r"``.
        value_format (str): format of the numbers written with ``values``.

    Returns:
        matplotlib.axes.Axes: the axes drawn on; save with ``ax.figure.savefig(path)``.

    Examples::

        >>> import torch
        >>> ax = plot_timeseries_attributions(torch.randn(5, 3), feature_names=["hr", "bp", "spo2"])
        >>> ax.figure.savefig("attr.png")  # doctest: +SKIP
    """
    a = _as_2d(attributions)
    vals = _as_2d(values) if values is not None else None
    if vals is not None and vals.shape != a.shape:
        raise ValueError(f"values has shape {tuple(vals.shape)}, attributions {tuple(a.shape)}")
    keep = None
    if mask is not None:
        keep = torch.as_tensor(mask).detach().to("cpu").reshape(-1).bool()
        if keep.numel() != a.shape[0]:
            raise ValueError(f"mask has {keep.numel()} entries for {a.shape[0]} time steps")
        a = a[keep]
        vals = vals[keep] if vals is not None else None
    T, F = a.shape
    if feature_names is not None and len(feature_names) != F:
        raise ValueError(f"{len(feature_names)} feature_names for {F} features")
    labels = list(time_labels) if time_labels is not None else list(range(len(keep) if keep is not None else T))
    if keep is not None:
        labels = [lab for lab, k in zip(labels, keep.tolist()) if k]
    if len(labels) != T:
        raise ValueError(f"{len(labels)} time_labels for {T} time steps")

    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(4.0, 0.55 * T + 2.0), max(2.0, 0.4 * F + 1.2)))
        ax = fig.add_subplot(1, 1, 1)
    lim = float(a.abs().max()) if a.numel() else 1.0
    lim = lim if lim > 0 else 1.0
    image = ax.imshow(a.T.numpy(), aspect="auto", cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xticks(range(T))
    ax.set_xticklabels([str(x) for x in labels], rotation=45 if T > 8 else 0, ha="right" if T > 8 else "center")
    ax.set_yticks(range(F))
    ax.set_yticklabels(list(feature_names) if feature_names is not None else [str(i) for i in range(F)])
    ax.set_xlabel("time step / visit")
    if vals is not None:
        for t in range(T):
            for f in range(F):
                dark = abs(float(a[t, f])) > 0.6 * lim
                ax.text(
                    t,
                    f,
                    value_format.format(float(vals[t, f])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.figure.colorbar(image, ax=ax, label="attribution")
    if title:
        ax.set_title(title)
    return ax
