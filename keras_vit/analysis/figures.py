"""Matplotlib figures of the analyses: one function per figure, each returning a
`matplotlib.figure.Figure` (no pyplot, so no GUI backend and no global state).

"Panels" are the figure's axes other than colorbars; `panel_count` counts them.
"""

import os

import numpy as np
from matplotlib.figure import Figure

from pipelines.errors import UserError

_COLORBAR_LABEL = "<colorbar>"  # The label matplotlib gives colorbar axes.


def panel_count(figure):
    """Number of panels (axes that are not colorbars) in a figure."""
    return sum(1 for axes in figure.axes if axes.get_label() != _COLORBAR_LABEL)


def save(figure, path, dpi=100):
    """Writes the figure as a PNG at `path` (parent directories created); returns `path`."""
    if not str(path).lower().endswith(".png"):
        raise UserError(f"Figures are written as PNG: the path must be a .png file, got {path}.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    return path


def attention_figure(images, maps, titles=None):
    """Paper Figure 6: each image next to its attention-rollout heat map.

    Args:
        images: (B, height, width, 3) pixels in [0, 255].
        maps: (B, gh, gw) in [0, 1], from `rollout_map`; stretched over the image.
        titles: optional B strings (e.g. file name and top class).

    Returns:
        A Figure with B rows of 2 panels (input, attention over input): 2 · B panels.
    """
    images = np.clip(np.asarray(images, np.float64) / 255.0, 0.0, 1.0)
    maps = np.asarray(maps, np.float64)
    if images.ndim != 4 or maps.ndim != 3 or len(images) != len(maps):
        raise ValueError(f"Expected images (B, h, w, 3) and maps (B, gh, gw), got {images.shape} "
                         f"and {maps.shape}.")
    figure = Figure(figsize=(6, 3 * len(images)), layout="constrained")
    axes = figure.subplots(len(images), 2, squeeze=False)
    for index, (image, heat) in enumerate(zip(images, maps)):
        height, width = image.shape[:2]
        left, right = axes[index]
        left.imshow(image)
        left.set_title(titles[index] if titles else "input", fontsize=8)
        right.imshow(image)
        right.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear",
                     extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        right.set_title("attention rollout", fontsize=8)
        for ax in (left, right):
            ax.set_axis_off()
    return figure


def position_embedding_figure(similarity):
    """Paper Figure 7 (centre): for every patch, its position embedding's cosine similarity
    with all others, drawn as a gh x gw grid of gh x gw maps.

    Args:
        similarity: (gh, gw, gh, gw) from `position_embedding_similarity`.

    Returns:
        A Figure with gh · gw panels and a colorbar.
    """
    similarity = np.asarray(similarity)
    gh, gw = similarity.shape[:2]
    figure = Figure(figsize=(max(4.0, 0.5 * gw + 1.0), max(4.0, 0.5 * gh)), layout="constrained")
    axes = figure.subplots(gh, gw, squeeze=False)
    image = None
    for row in range(gh):
        for col in range(gw):
            ax = axes[row, col]
            image = ax.imshow(similarity[row, col], cmap="viridis", vmin=-1.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(str(row + 1), fontsize=6)
            if row == gh - 1:
                ax.set_xlabel(str(col + 1), fontsize=6)
    figure.supxlabel("input patch column", fontsize=8)
    figure.supylabel("input patch row", fontsize=8)
    figure.suptitle("Position embedding similarity", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity")
    return figure


def attention_distance_figure(distances, image_size=None, title=None):
    """Paper Figure 7 (right): mean attention distance of each head against layer depth.

    Args:
        distances: (L, H) pixels, from `mean_attention_distance`.
        image_size: optional side in pixels; draws the y axis up to the image diagonal's half.
        title: optional title (e.g. the model's name).

    Returns:
        A Figure with 1 panel: one dot per head at each layer (1-based).
    """
    distances = np.asarray(distances)
    num_layers, num_heads = distances.shape
    figure = Figure(figsize=(5, 4), layout="constrained")
    ax = figure.subplots()
    for head in range(num_heads):
        ax.scatter(np.arange(1, num_layers + 1), distances[:, head], s=12,
                   label=f"head {head + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(np.arange(1, num_layers + 1))
    ax.set_ylim(bottom=0.0, top=image_size if image_size else None)
    if num_heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set_title(title or "Mean attention distance", fontsize=9)
    return figure


def curves_figure(groups, x_axis="epoch", title=None):
    """Training curves: one panel per group ("loss", "accuracy", "learning rate").

    Args:
        groups: from `group_curves`: {group: [(label, steps, values), ...]}.
        x_axis: "epoch" or "step", the x label.
        title: optional title.

    Returns:
        A Figure with len(groups) panels side by side; learning rate on a log scale.
    """
    if not groups:
        raise ValueError("No loss, accuracy or learning-rate scalars to draw.")
    figure = Figure(figsize=(4.5 * len(groups), 3.5), layout="constrained")
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for ax, (group, curves) in zip(axes, groups.items()):
        for label, steps, values in curves:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                    label=label)
        ax.set_xlabel(x_axis)
        ax.set_ylabel(group)
        if group == "learning rate" and all(np.all(values > 0) for _, _, values in curves):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def confusion_figure(confusion, class_names=None, max_labels=40):
    """Row-normalized confusion matrix (rows: true class, columns: predicted class).

    Args:
        confusion: (K, K) counts.
        class_names: optional K names, shown as tick labels when K <= max_labels.

    Returns:
        A Figure with 1 panel and a colorbar (fraction of each true class).
    """
    confusion = np.asarray(confusion, np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    normalized = confusion / np.where(totals > 0, totals, 1.0)
    num_classes = len(confusion)
    side = min(12.0, max(4.0, 0.3 * num_classes + 2.0))
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    if num_classes <= max_labels:
        names = class_names or [str(i) for i in range(num_classes)]  # else tick = class index
        ax.set_xticks(np.arange(num_classes), names, rotation=90, fontsize=7)
        ax.set_yticks(np.arange(num_classes), names, fontsize=7)
        if num_classes <= 20:
            for true in range(num_classes):
                for predicted in range(num_classes):
                    if confusion[true, predicted]:
                        ax.text(predicted, true, int(confusion[true, predicted]), ha="center",
                                va="center", fontsize=6,
                                color="white" if normalized[true, predicted] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(confusion.sum())} examples)", fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    return figure
