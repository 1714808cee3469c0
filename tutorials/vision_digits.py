# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Vision: a tiny ViT on handwritten digits, GIM vs Integrated Gradients
#
# scikit-learn ships 1,797 handwritten digits as 8x8 grey images (`load_digits`, no
# download). We train a tiny Vision Transformer (`torch.nn` only: 2x2 patches, a class
# token, two pre-norm encoder layers) on them in seconds, attribute its predictions to
# the pixels with GIM and with Integrated Gradients, and draw the attributions with
# Captum's `visualize_image_attr` and `visualize_image_attr_multiple`.
#
# Figures are written as PNG files (matplotlib's Agg backend, no window) to
# `$CAPTUM_GIM_TUTORIAL_OUT` (default `results/tutorials`).

# %%
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import nn

from captum.attr import IntegratedGradients, visualization
from captum_gim import GIMAttribution

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: one thread is fastest, and polite on shared CPUs
OUT = Path(os.environ.get("CAPTUM_GIM_TUTORIAL_OUT", "results/tutorials")) / "vision_digits"
OUT.mkdir(parents=True, exist_ok=True)
START = time.perf_counter()
# Captum notes that it switched on requires_grad for our input images; that is expected.
warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")

# %% [markdown]
# ## Data

# %%
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
labels = torch.tensor(digits.target)
perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
train, test = perm[:1500], perm[1500:]
print(images.shape, "train", len(train), "test", len(test))

# %% [markdown]
# ## A tiny ViT
#
# Patch embedding as a strided convolution, a learned class token and positions,
# `nn.TransformerEncoderLayer`s with `norm_first=True`, a final `nn.LayerNorm` and a
# linear head. GIM's built-in rules handle `nn.MultiheadAttention` and every
# `nn.LayerNorm` in it.

# %%
class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, patch: int = 2):
        super().__init__()
        self.patches = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        n = (8 // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.position
        return self.head(self.norm(self.encoder(tokens))[:, 0])


model = TinyViT()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
for epoch in range(12):
    order = train[torch.randperm(len(train))]
    for start in range(0, len(order), 50):
        batch = order[start : start + 50]
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
model.eval()
with torch.no_grad():
    accuracy = (model(images[test]).argmax(-1) == labels[test]).float().mean().item()
print(f"test accuracy {accuracy:.3f} (trained in {time.perf_counter() - START:.1f}s)")

# %% [markdown]
# ## Attributions
#
# `GIMAttribution` is a Captum `GradientAttribution`: same `attribute(inputs, baselines,
# target)` as `IntegratedGradients`, and the same baseline (a black image) for both.

# %%
x = images[test[:64]]
with torch.no_grad():
    target = model(x).argmax(-1)
gim = GIMAttribution(model)
ig = IntegratedGradients(model)
t0 = time.perf_counter()
attr_gim = gim.attribute(x, target=target)
t_gim = time.perf_counter() - t0
t0 = time.perf_counter()
attr_ig = ig.attribute(x, target=target, n_steps=32)
t_ig = time.perf_counter() - t0
print(gim.last_report)
print(f"GIM {t_gim:.2f}s, IG (32 steps) {t_ig:.2f}s for {len(x)} images")

# %% [markdown]
# ## A quick faithfulness check: delete the top pixels
#
# Blank the 8 pixels (of 64) each method ranks highest and measure how much the
# probability of the predicted class drops; a larger drop means the ranking found
# pixels the model actually relies on. A random ranking is the floor. This is one
# small measurement on one model, not a benchmark (see the comparison results page).

# %%
def drop_after_deleting(scores: torch.Tensor, k: int = 8) -> float:
    flat = scores.reshape(len(scores), -1)
    top = flat.argsort(dim=-1, descending=True)[:, :k]
    masked = x.reshape(len(x), -1).clone()
    masked.scatter_(1, top, 0.0)
    with torch.no_grad():
        before = model(x).softmax(-1).gather(1, target[:, None])
        after = model(masked.reshape_as(x)).softmax(-1).gather(1, target[:, None])
    return (before - after).mean().item()


random_scores = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
for name, scores in [("GIM", attr_gim), ("IG", attr_ig), ("random", random_scores)]:
    print(f"{name:7} mean probability drop after deleting 8 pixels: {drop_after_deleting(scores):.3f}")

# %% [markdown]
# ## Captum's image visualisations
#
# Captum wants `(H, W, C)` numpy arrays. We pass `use_pyplot=False`, so each call returns
# a `matplotlib.figure.Figure` without opening a window, and save it.

# %%
def hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(1, 2, 0).numpy()


first = {}  # the first digit's figures, shown below
for i in range(3):
    image = np.repeat(hwc(x[i]), 3, axis=2)  # grey as RGB, values in [0, 1]
    for name, attr in [("gim", attr_gim), ("ig", attr_ig)]:
        fig, _ = visualization.visualize_image_attr_multiple(
            hwc(attr[i]),
            image,
            methods=["original_image", "heat_map", "blended_heat_map"],
            signs=["all", "all", "absolute_value"],
            titles=[f"digit {int(target[i])}", f"{name.upper()} (signed)", f"{name.upper()} |attr|"],
            show_colorbar=True,
            fig_size=(9, 3),
            use_pyplot=False,
        )
        fig.savefig(OUT / f"example{i}_{name}.png", dpi=80)
        if i == 0:
            first[name] = fig

# One figure, GIM and IG side by side for eight digits, with visualize_image_attr on
# axes we provide.
fig = Figure(figsize=(16, 4.4))
axes = fig.subplots(2, 8)
for i in range(8):
    for row, (name, attr) in enumerate([("GIM", attr_gim), ("IG", attr_ig)]):
        visualization.visualize_image_attr(
            hwc(attr[i]),
            np.repeat(hwc(x[i]), 3, axis=2),
            method="blended_heat_map",
            sign="all",
            plt_fig_axis=(fig, axes[row, i]),
            title=f"{name}: {int(target[i])}",
            use_pyplot=False,
        )
fig.savefig(OUT / "gim_vs_ig.png", dpi=80)
print("wrote", sorted(p.name for p in OUT.glob("*.png")))
print(f"done in {time.perf_counter() - START:.1f}s")

# %% [markdown]
# In a notebook the figures show here (as a script, open the PNG files). The first digit
# under GIM and under IG:

# %%
first["gim"]

# %%
first["ig"]

# %% [markdown]
# Eight digits, GIM (top) and IG (bottom):

# %%
fig
