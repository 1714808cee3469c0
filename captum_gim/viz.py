r"""Plots and HTML for attributions, without IPython and on current matplotlib.

- :func:`text_records_html`: Captum's ``visualize_text`` table, built from the same
  :class:`captum.attr.visualization.VisualizationDataRecord` records and Captum's own
  formatting helpers, returned as an HTML string (Captum's function needs IPython to
  display it).
- :func:`visualize_timeseries_attr`: Captum's function of the same name, working on
  matplotlib >= 3.9 (Captum's calls ``matplotlib.cm.get_cmap``, removed in 3.9), and
  never touching pyplot's global state unless asked to.
- :func:`plot_timeseries_attributions`: a heat map of one patient's (or sequence's)
  attributions over time steps or visits, with padding masked out.

The figures and the page of ``captum-gim compare`` live in
:mod:`captum_gim.evaluation.plots` and :mod:`captum_gim.evaluation.page`.

All figures are made with the object-oriented API (:class:`matplotlib.figure.Figure`),
so nothing here needs a display or changes the matplotlib backend.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "text_records_html",
    "visualize_timeseries_attr",
    "plot_timeseries_attributions",
]

# --------------------------------------------------------------------------- text


def _word_cells(words: Sequence[str], importances: Sequence[float]) -> str:
    from captum.attr._utils.visualization import _get_color, format_special_tokens

    tags = ["<td>"]
    for word, imp in zip(words, importances):
        w = html.escape(format_special_tokens(str(word)))
        v = 0.0 if imp is None or not math.isfinite(float(imp)) else float(imp)
        tags.append(
            f'<mark style="background-color: {_get_color(v)}; opacity:1.0; '
            f'line-height:1.75" title="{v:+.3f}"><font color="black"> {w} </font></mark>'
        )
    tags.append("</td>")
    return "".join(tags)


def text_records_html(
    records: Iterable[Any],
    legend: bool = True,
    row_headers: Optional[Sequence[str]] = None,
    header_name: str = "Method",
) -> str:
    r"""Captum's ``visualize_text`` table as an HTML string (no IPython needed).

    Args:
        records (iterable of VisualizationDataRecord): as for Captum's
            ``visualization.visualize_text``; ``word_attributions`` should be in
            [-1, 1] (larger values are clipped, as in Captum).
        legend (bool): add Captum's negative / neutral / positive legend.
        row_headers (sequence of str, optional): an extra first column (e.g. the
            method of each row).
        header_name (str): the title of that column.

    Returns:
        str: an HTML ``<table>``.

    Example::

        >>> from captum.attr import visualization
        >>> rec = visualization.VisualizationDataRecord(
        ...     [0.9, -0.2], 0.97, "pos", "pos", "pos", 0.7, ["great", "movie"], 0.0)
        >>> html = text_records_html([rec], row_headers=["GIM"])
        >>> "great" in html and "GIM" in html
        True
    """
    from captum.attr._utils.visualization import _get_color, format_classname

    records = list(records)
    dom = ['<table class="attr">']
    head = "".join(
        f"<th>{h}</th>"
        for h in ([header_name] if row_headers is not None else [])
        + ["True Label", "Predicted Label", "Attribution Label", "Attribution Score",
           "Word Importance"]
    )
    dom.append(f"<tr>{head}</tr>")
    for k, r in enumerate(records):
        attrs = r.word_attributions
        attrs = attrs.tolist() if hasattr(attrs, "tolist") else list(attrs)
        cells = []
        if row_headers is not None:
            cells.append(format_classname(html.escape(str(row_headers[k]))))
        pred = r.pred_prob
        pred_txt = f"{r.pred_class} ({pred:.2f})" if isinstance(pred, (int, float)) else str(r.pred_class)
        cells += [
            format_classname(html.escape(str(r.true_class))),
            format_classname(html.escape(pred_txt)),
            format_classname(html.escape(str(r.attr_class))),
            format_classname(f"{r.attr_score:.2f}" if isinstance(r.attr_score, (int, float)) else str(r.attr_score)),
            _word_cells(r.raw_input_ids, attrs),
        ]
        dom.append("<tr>" + "".join(cells) + "</tr>")
    dom.append("</table>")
    if legend:
        dom.append('<div class="legend"><b>Legend: </b>')
        for value, label in zip([-1, 0, 1], ["Negative", "Neutral", "Positive"]):
            dom.append(
                '<span style="display: inline-block; width: 10px; height: 10px; '
                f'border: 1px solid; background-color: {_get_color(value)}"></span> {label} '
            )
        dom.append("</div>")
    return "".join(dom)


# --------------------------------------------------------------------------- time series


def visualize_timeseries_attr(
    attr: np.ndarray,
    data: np.ndarray,
    x_values: Optional[np.ndarray] = None,
    method: str = "overlay_individual",
    sign: str = "absolute_value",
    channel_labels: Optional[List[str]] = None,
    channels_last: bool = True,
    plt_fig_axis: Optional[Tuple[Figure, Union[Axes, np.ndarray]]] = None,
    outlier_perc: Union[int, float] = 2,
    cmap: Optional[Any] = None,
    alpha_overlay: float = 0.7,
    show_colorbar: bool = False,
    title: Optional[str] = None,
    fig_size: Tuple[int, int] = (6, 6),
    use_pyplot: bool = False,
    **pyplot_kwargs: Any,
) -> Tuple[Figure, Union[Axes, np.ndarray]]:
    r"""Captum's ``visualize_timeseries_attr``, working on matplotlib >= 3.9.

    Same arguments and behaviour as
    :func:`captum.attr.visualization.visualize_timeseries_attr` (``attr`` and ``data``
    of shape ``(N, C)``, or ``(C, N)`` with ``channels_last=False``; methods
    ``overlay_individual``, ``overlay_combined``, ``colored_graph``; signs
    ``absolute_value``, ``positive``, ``negative``, ``all``), except that the colormap
    is looked up in ``matplotlib.colormaps`` and that, by default
    (``use_pyplot=False``), it builds a stand-alone :class:`~matplotlib.figure.Figure`
    and does not call ``plt.show()``.

    Returns:
        (figure, axis or array of axes)

    Example::

        >>> import numpy as np
        >>> t = np.linspace(0, 6, 50)
        >>> data = np.stack([np.sin(t), np.cos(t)], axis=1)
        >>> fig, axes = visualize_timeseries_attr(data * 0.5, data, method="overlay_individual")
        >>> len(axes)
        2
    """
    import matplotlib
    from matplotlib import colors
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection

    from captum.attr._utils.visualization import _initialize_cmap_and_vmin_vmax, _normalize_attr

    attr = np.asarray(attr, dtype=np.float64)
    data = np.asarray(data, dtype=np.float64)
    if attr.ndim != 2 or data.ndim != 2:
        raise ValueError(f"expected attr and data of shape (N, C), got {attr.shape} and {data.shape}")
    if attr.shape != data.shape:
        raise ValueError(f"attr {attr.shape} and data {data.shape} must have the same shape")
    if method not in ("overlay_individual", "overlay_combined", "colored_graph"):
        raise ValueError(f"invalid visualization method {method!r}")
    if channels_last:
        attr, data = attr.T, data.T
    n_channels, length = attr.shape
    if method == "overlay_combined":
        attr = attr.sum(axis=0, keepdims=True)
    x = np.arange(length) if x_values is None else np.asarray(x_values)
    if x.shape[0] != length:
        raise ValueError("x_values must have the same length as the data")

    n_rows = 1 if method == "overlay_combined" else n_channels
    if plt_fig_axis is not None:
        fig, axis = plt_fig_axis
    elif use_pyplot:
        import matplotlib.pyplot as plt

        fig, axis = plt.subplots(n_rows, 1, figsize=fig_size, sharex=True, squeeze=False)
        axis = axis[:, 0]
    else:
        fig = Figure(figsize=fig_size)
        axis = fig.subplots(n_rows, 1, sharex=True, squeeze=False)[:, 0]
    axes = np.atleast_1d(np.asarray(axis, dtype=object))

    norm_attr = _normalize_attr(attr, sign, outlier_perc)
    default_cmap, vmin, vmax = _initialize_cmap_and_vmin_vmax(sign)
    cmap_obj = cmap if cmap is not None else default_cmap
    if isinstance(cmap_obj, str):
        cmap_obj = matplotlib.colormaps[cmap_obj]
    norm = colors.Normalize(vmin, vmax)
    half = (x[1] - x[0]) / 2.0 if length > 1 else 0.5

    def spans(ax: Axes, values: np.ndarray) -> None:
        for xc, v in zip(x, values):
            ax.axvspan(xc - half, xc + half, facecolor=cmap_obj(norm(v)), edgecolor=None,
                       alpha=alpha_overlay)

    if method == "overlay_individual":
        for c in range(n_channels):
            axes[c].plot(x, data[c], **pyplot_kwargs)
            if channel_labels is not None:
                axes[c].set_ylabel(channel_labels[c])
            spans(axes[c], norm_attr[c])
    elif method == "overlay_combined":
        cycle = matplotlib.colormaps["Dark2"].colors
        for c in range(n_channels):
            label = channel_labels[c] if channel_labels else None
            axes[0].plot(x, data[c], label=label, color=cycle[c % len(cycle)], **pyplot_kwargs)
        spans(axes[0], norm_attr[0])
        if channel_labels:
            axes[0].legend(loc="best")
    else:
        for c in range(n_channels):
            pts = np.array([x, data[c]]).T.reshape(-1, 1, 2)
            lc = LineCollection(np.concatenate([pts[:-1], pts[1:]], axis=1), cmap=cmap_obj,
                                norm=norm, **pyplot_kwargs)
            lc.set_array(norm_attr[c, :-1] if length > 1 else norm_attr[c])
            axes[c].add_collection(lc)
            lo, hi = float(np.min(data[c])), float(np.max(data[c]))
            pad = 0.1 * (hi - lo) if hi > lo else 1.0
            axes[c].set_ylim(lo - pad, hi + pad)
            if channel_labels is not None:
                axes[c].set_ylabel(channel_labels[c])
    if n_rows > 1:
        fig.subplots_adjust(hspace=0)
    axes[-1].set_xlim(x[0] - half, x[-1] + half)
    if show_colorbar:
        fig.colorbar(ScalarMappable(norm, cmap_obj), ax=list(axes), orientation="horizontal",
                     alpha=1.0 if method == "colored_graph" else alpha_overlay, fraction=0.05)
    if title:
        axes[0].set_title(title)
    if use_pyplot and plt_fig_axis is None:
        import matplotlib.pyplot as plt

        plt.show()
    return fig, (axes if len(axes) > 1 else axes[0])


# --------------------------------------------------------------------------- time series


def _timeseries_2d(x: Union[Tensor, Any]) -> Tensor:
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
    a = _timeseries_2d(attributions)
    vals = _timeseries_2d(values) if values is not None else None
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
