"""The plotting helpers: no IPython, no pyplot state, matplotlib >= 3.9."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from captum.attr import visualization

from captum_gim.viz import text_records_html, visualize_timeseries_attr


@pytest.mark.parametrize("method", ["overlay_individual", "overlay_combined", "colored_graph"])
@pytest.mark.parametrize("sign", ["absolute_value", "positive", "negative", "all"])
def test_timeseries_every_method_and_sign(method, sign, tmp_path):
    t = np.linspace(0, 6, 40)
    data = np.stack([np.sin(t), np.cos(t), t / 6], axis=1)  # (N, C)
    attr = data * np.array([1.0, -0.5, 0.2])
    fig, axes = visualize_timeseries_attr(
        attr, data, method=method, sign=sign, channel_labels=["a", "b", "c"],
        show_colorbar=True, title="t")
    assert isinstance(fig, Figure)
    n_axes = 1 if method == "overlay_combined" else 3
    axes = np.atleast_1d(axes)
    assert len(axes) == n_axes
    for ax in axes:
        if method == "colored_graph":  # one line coloured segment by segment
            (lc,) = ax.collections
            assert len(lc.get_segments()) == 39
        else:  # one coloured span per time step
            assert len(ax.patches) == 40
    fig.savefig(tmp_path / "ts.png")
    assert (tmp_path / "ts.png").read_bytes()[:4] == b"\x89PNG"


def test_timeseries_channels_first_and_given_axes():
    data = np.random.default_rng(0).normal(size=(2, 25))  # (C, N)
    fig = Figure()
    axes = fig.subplots(2, 1)
    out_fig, out_axes = visualize_timeseries_attr(
        data, data, channels_last=False, plt_fig_axis=(fig, axes), cmap="viridis")
    assert out_fig is fig and list(out_axes) == list(axes)
    for c in range(2):  # channel c on axis c, over the 25 time steps
        np.testing.assert_array_equal(axes[c].lines[0].get_ydata(), data[c])
    with pytest.raises(ValueError, match="same shape"):
        visualize_timeseries_attr(data, data[:, :5])


def test_matplotlib_is_one_that_breaks_captum():
    # the helper exists because Captum's calls matplotlib.cm.get_cmap (deprecated in 3.7,
    # gone since 3.11)
    major, minor = (int(p) for p in matplotlib.__version__.split(".")[:2])
    if (major, minor) < (3, 11):
        pytest.skip("matplotlib before 3.11 still has matplotlib.cm.get_cmap")
    assert not hasattr(matplotlib.cm, "get_cmap")


def test_text_records_html_without_ipython():
    rec = visualization.VisualizationDataRecord(
        np.array([0.9, -0.4, 0.0]), 0.97, "pos", "pos", "pos", 0.5, ["<s>", "great", "a&b"], 0.0)
    page = text_records_html([rec], row_headers=["GIM"])
    assert page.startswith("<table") and "GIM" in page
    assert "#s" in page  # Captum's special-token formatting
    assert "a&amp;b" in page  # escaped
    assert "hsl(120, 75%, 55%)" in page and "hsl(0, 75%, 84%)" in page  # Captum's colours
    assert "Legend" in page
    assert "Legend" not in text_records_html([rec], legend=False)
