"""Pictures of an evaluation: token-importance heatmaps, training curves, the method comparison.

Heatmaps follow the paper's medical case study: each response token is drawn with a background whose
strength is its importance weight (white = least, dark red = most important in that response); the
critical span, when known, is outlined. They come as HTML (for Dagster's UI) and PNG (matplotlib with
the Agg backend, for MLflow and the README). Nothing here loads a model: callers hand in tokens and
weights.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

__all__ = [
    "HeatmapRow",
    "HeatmapSection",
    "png_markdown",
    "TradeoffPanel",
    "save_comparison_png",
    "save_tradeoff_png",
    "save_token_heatmap_png",
    "save_training_curves_png",
    "token_display_text",
    "token_heatmap_html",
]

CMAP = "Reds"
EOS_LABEL = "⟨eos⟩"


@dataclass(frozen=True)
class HeatmapRow:
    """One response: its tokens as text, one weight per token, the indices of critical-span tokens."""

    label: str
    tokens: list[str]
    weights: list[float]
    span: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.weights):
            raise ValueError(f"{self.label}: {len(self.tokens)} tokens but {len(self.weights)} weights")


@dataclass(frozen=True)
class HeatmapSection:
    """The responses of one prompt (chosen, rejected, anchor), drawn together under the prompt."""

    title: str  # one or more lines (a prompt's turns), each drawn on its own line
    rows: list[HeatmapRow] = field(default_factory=list)


def token_display_text(response: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Each token's text cut from the response by its character offsets; eos (empty span) as ⟨eos⟩."""
    return [response[s:e] if e > s else EOS_LABEL for s, e in offsets]


def _shades(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to [0, 1] within the response (max weight = 1): what the colour shows."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return w
    top = float(np.max(w))
    return np.clip(w / top, 0.0, 1.0) if top > 0 else np.zeros_like(w)


def _colour(shade: float) -> str:
    # Cap the colour at 85% of the map so the darkest background still lets black text be read.
    return to_hex(colormaps[CMAP](0.85 * float(shade)))


def token_heatmap_html(sections: Sequence[HeatmapSection], caption: str = "") -> str:
    """A self-contained HTML fragment: one <span class="tok"> per token, shaded by its weight.

    Every token span carries data-w (its weight) and data-i (its index), so tools and tests can read
    the picture back; span tokens are outlined.
    """
    parts = [
        '<div class="tidpo-heatmap" style="font-family: monospace; font-size: 13px; line-height: 1.9;">',
    ]
    if caption:
        parts.append(f"<p><em>{html.escape(caption)}</em></p>")
    for section in sections:
        title = "<br>".join(
            html.escape(line) for line in section.title.split("\n")
        )  # a prompt's turns, one per line
        parts.append(f"<h4>{title}</h4>")
        for row in section.rows:
            parts.append(f'<div class="row"><strong>{html.escape(row.label)}</strong>: ')
            for i, (token, weight, shade) in enumerate(
                zip(row.tokens, row.weights, _shades(row.weights), strict=True)
            ):
                border = "outline: 2px solid #1f4e9c;" if i in row.span else ""
                text = html.escape(token).replace("\n", "⏎").replace(" ", "&nbsp;")
                parts.append(
                    f'<span class="tok" data-i="{i}" data-w="{weight:.4f}" title="w={weight:.3f}" '
                    f'style="background:{_colour(shade)};{border}">{text}</span>'
                )
            parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _fig_to_file(fig: plt.Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


_DrawCommand = tuple[str, float, float, str, dict]
"""(kind, x_px, y_px, text, extra): one piece of a laid-out heatmap, with y growing downwards."""

_TEXT_STYLES = {
    "caption": {"style": "italic"},
    "title": {"weight": "bold", "color": "#333333"},
    "label": {"weight": "bold"},
}


@dataclass(frozen=True)
class _HeatmapGeometry:
    """Pixel sizes shared by the heatmap's layout and drawing passes."""

    width_px: float
    line_px: float
    font_size: float
    dpi: int
    pad_px: float = 2.0


def save_token_heatmap_png(
    sections: Sequence[HeatmapSection],
    path: str | Path,
    *,
    width_in: float = 10.0,
    font_size: float = 9.0,
    dpi: int = 110,
    caption: str = "",
) -> dict[str, int]:
    """Draw the heatmap as a PNG with word-wrapped, shaded tokens; returns tokens drawn per row label.

    Two passes: token widths are measured on a scratch canvas, lines are laid out, then the figure is
    made exactly as tall as its content.
    """
    geometry = _HeatmapGeometry(
        width_px=width_in * dpi, line_px=font_size * 2.0 * dpi / 72, font_size=font_size, dpi=dpi
    )
    scratch = plt.figure(figsize=(width_in, 2), dpi=dpi)
    commands, drawn, height_px = _layout_heatmap(
        sections, caption, _text_measurer(scratch, font_size), geometry
    )
    plt.close(scratch)
    fig = plt.figure(figsize=(width_in, height_px / dpi), dpi=dpi)
    for command in commands:
        _draw_command(fig, command, height_px, geometry)
    _fig_to_file(fig, path, dpi)
    return drawn


def _text_measurer(scratch: plt.Figure, font_size: float) -> Callable[..., float]:
    """Width in pixels of a text drawn (then removed) on the scratch figure, in the heatmap's font."""
    renderer = scratch.canvas.get_renderer()

    def measure(text: str, **kwargs) -> float:
        artist = scratch.text(0, 0, text, fontsize=font_size, family="monospace", parse_math=False, **kwargs)
        width = artist.get_window_extent(renderer).width
        artist.remove()
        return width

    return measure


def _layout_heatmap(
    sections: Sequence[HeatmapSection],
    caption: str,
    measure: Callable[..., float],
    geometry: _HeatmapGeometry,
) -> tuple[list[_DrawCommand], dict[str, int], float]:
    """The draw commands, the tokens laid out per row label, and the height in pixels they need."""
    line_px = geometry.line_px
    commands: list[_DrawCommand] = []
    drawn: dict[str, int] = {}
    y = line_px
    if caption:
        commands.append(("caption", 0.0, y, " ".join(caption.split()), {}))
        y += line_px * 1.2
    for section in sections:
        for line in section.title.split("\n"):  # a prompt's turns, one per line
            commands.append(("title", 0.0, y, " ".join(line.split()), {}))
            y += line_px
        y += line_px * 0.1
        for row in section.rows:
            y = _layout_row(row, y, measure, geometry, commands)
            drawn[row.label] = drawn.get(row.label, 0) + len(row.tokens)
            y += line_px * 1.4
        y += line_px * 0.4
    return commands, drawn, y + line_px * 0.5


def _layout_row(
    row: HeatmapRow,
    y: float,
    measure: Callable[..., float],
    geometry: _HeatmapGeometry,
    commands: list[_DrawCommand],
) -> float:
    """Append the row's label and its tokens, wrapped under the label's indent; returns the last line's y."""
    label = f"{row.label}:"
    commands.append(("label", 0.0, y, label, {}))
    indent = measure(label + " ", weight="bold")
    x = indent
    for i, (token, shade) in enumerate(zip(row.tokens, _shades(row.weights), strict=True)):
        text = token.replace("\n", "⏎")
        width = measure(text) + 2 * geometry.pad_px
        if x + width > geometry.width_px and x > indent:
            x, y = indent, y + geometry.line_px
        commands.append(("token", x, y, text, {"shade": shade, "span": i in row.span}))
        x += width + 1.0
    return y


def _draw_command(
    fig: plt.Figure, command: _DrawCommand, height_px: float, geometry: _HeatmapGeometry
) -> None:
    """Draw one laid-out piece: a token on its shaded (and, in the critical span, outlined) box, or text."""
    kind, x, top, text, extra = command
    fx, fy = x / geometry.width_px, 1.0 - top / height_px
    font = {"fontsize": geometry.font_size, "family": "monospace", "parse_math": False, "va": "baseline"}
    if kind != "token":
        fig.text(fx, fy, text, **font, **_TEXT_STYLES[kind])
        return
    pad_px = geometry.pad_px
    fig.text(
        fx + pad_px / geometry.width_px,
        fy,
        text,
        **font,
        bbox={
            "boxstyle": f"square,pad={pad_px / (geometry.font_size * geometry.dpi / 72):.2f}",
            "facecolor": _colour(extra["shade"]),
            "edgecolor": "#1f4e9c" if extra["span"] else "none",
            "linewidth": 1.4 if extra["span"] else 0.0,
        },
    )


def save_training_curves_png(
    series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: str | Path, *, title: str = ""
) -> Path:
    """One panel per metric (e.g. loss, rewards/accuracies, rewards/margins) and one line per run.

    `series` maps a run label to {metric: [(step, value), ...]}; metrics without points are left out.
    """
    metrics: list[str] = []
    for per_run in series.values():
        for metric, points in per_run.items():
            if points and metric not in metrics:
                metrics.append(metric)
    if not metrics:
        raise ValueError("no metric history to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, per_run in series.items():
            points = sorted(per_run.get(metric, []))
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=label, linewidth=1.4)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(series) > 1:
        axes[0][-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _fig_to_file(fig, path, 110)


def save_comparison_png(
    table: Sequence[Mapping[str, object]],
    metrics: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Bars of mean +- standard deviation per method, one panel per metric.

    `table` rows carry "method", f"{metric}_mean" and f"{metric}_std" (as `comparison.aggregate` makes).
    """
    shown = [m for m in metrics if any(_finite(r.get(f"{m}_mean")) for r in table)]
    if not shown:
        raise ValueError("none of the metrics has a finite value")
    columns = min(4, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    methods = [str(r["method"]) for r in table]
    colours = [colormaps["tab10"](i % 10) for i in range(len(methods))]
    for ax, metric in zip(axes.flat, shown, strict=False):
        means = [_as_float(r.get(f"{metric}_mean")) for r in table]
        stds = [_as_float(r.get(f"{metric}_std")) for r in table]
        errors = [s if math.isfinite(s) else 0.0 for s in stds]
        ax.bar(
            range(len(methods)),
            [m if math.isfinite(m) else 0.0 for m in means],
            yerr=errors,
            color=colours,
            capsize=3,
        )
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _fig_to_file(fig, path, 110)


@dataclass(frozen=True)
class TradeoffPanel:
    """One scatter of a trade-off: per method, one (x, y) point per run; `level` draws a dashed line at that y
    (0.5 for a win rate: parity with the baseline)."""

    x_label: str
    y_label: str
    points: Mapping[str, Sequence[tuple[float, float]]]
    level: float | None = None


def save_tradeoff_png(panels: Sequence[TradeoffPanel], path: str | Path, *, title: str = "") -> Path:
    """Side-by-side scatters, a colour per method: each run as a dot, the method's mean as a large cross.
    The DPO paper's reward-KL frontier is one (KL to the reference on x, win rate on y)."""
    if not any(p.points for p in panels):
        raise ValueError("no points to draw")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    methods = list(dict.fromkeys(m for p in panels for m in p.points))
    colours = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    for ax, panel in zip(axes.flat, panels, strict=True):
        for method, points in panel.points.items():
            finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
            if not finite:
                continue
            xs, ys = zip(*finite, strict=True)
            ax.scatter(xs, ys, color=colours[method], s=22, alpha=0.6)
            ax.scatter(np.mean(xs), np.mean(ys), color=colours[method], marker="X", s=110, label=method)
        if panel.level is not None:
            ax.axhline(panel.level, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(panel.x_label, fontsize=9)
        ax.set_ylabel(panel.y_label, fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _fig_to_file(fig, path, 110)


def _as_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _finite(value: object) -> bool:
    return math.isfinite(_as_float(value))


def png_markdown(path: str | Path, alt: str = "") -> str:
    """Markdown with the PNG inlined as a base64 data URI (Dagster renders it in the asset's metadata)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"
