"""Plot specs as data, rendered to PNG with matplotlib (headless Agg canvas, imported lazily).

* ``CurvePlot`` — a training curve (e.g. ``valid_bpb`` against step): the mean over seeds per arm, with a min–max
  band. Complete and partial (interrupted) runs are drawn, failed runs are not; the legend says when partial runs
  are included.
* ``MetricPlot`` — one point per arm: x from the arm's ``params``, an ``info`` key or a final metric's mean, y the
  mean over complete seeds of a final metric with std error bars; ``fit="power_law"`` overlays y = a·x^(−α)
  fitted on the arm means.
* ``HeatmapPlot`` — per arm, the mean over complete seeds of a square matrix a run stores in its curves (e.g. the
  layer-by-layer weight similarity of a grown model).

``plot.render_png(results)`` returns PNG bytes (the caller writes them), ``plot.figure(results)`` the matplotlib figure
they are drawn from; ``plot.caption(results)`` is a line of text for the report (what was not measured, the fitted
exponent). None of them raises on a partial results document.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from effml.report._spec import Spec, check_choice, check_name, check_name_list, spec_from_dict
from effml.report.claims import complete_metric_values
from effml.report.stats import fit_power_law, format_number, mean_interval

__all__ = ["Plot", "CurvePlot", "MetricPlot", "HeatmapPlot", "plot_from_dict"]

_FILE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CURVE_STATUSES = ("complete", "partial")
_FIT_KINDS = ("power_law",)


def _arm_data(results: dict[str, Any], arm: str) -> dict[str, Any]:
    """The arm's entry in ``results["arms"]``, or {} when absent or malformed."""
    table = results.get("arms")
    data = table.get(arm) if isinstance(table, dict) else None
    return data if isinstance(data, dict) else {}


def _arm_label(results: dict[str, Any], arm: str) -> str:
    label = _arm_data(results, arm).get("label")
    return label if isinstance(label, str) and label else arm


def _selected_arms(results: dict[str, Any], arms: list[str] | None) -> list[str]:
    table = results.get("arms")
    return list(arms) if arms is not None else list(table) if isinstance(table, dict) else []


def _finite_metric_values(results: dict[str, Any], arm: str, metric: str) -> list[float]:
    values, _ = complete_metric_values(results, arm, metric)
    return [v for v in values.values() if math.isfinite(v)]


def _new_figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # lazy: keeps `import effml` fast; Figure needs no pyplot/global backend

    figure = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


_LAYOUT_ROUNDS = 4  # layouts tried to make room for moved labels before the figure's layout is frozen
# A moved label keeps this gap to the one above it: labels that only touched would overlap once a new layout snaps
# them to other pixels.
_LABEL_GAP_POINTS = 1.0


def _move_overlapping_labels(figure: Any, labels: list[Any]) -> bool:
    """Move text annotations (offset in points from their anchors) down, one label height (and a small gap) at a
    time, until none overlaps an earlier one, in the figure's current layout; return whether any moved."""
    placed: list[Any] = []
    moved = False
    for label in labels:
        for _ in range(2 * len(placed)):  # a box of the same height clears an earlier one in at most 2 steps
            box = label.get_window_extent()
            if not any(box.overlaps(other) for other in placed):
                break
            dx, dy = label.xyann
            label.xyann = (dx, dy - box.height * 72.0 / figure.dpi - _LABEL_GAP_POINTS)  # pixels to points
            moved = True
        placed.append(label.get_window_extent())
    return moved


def _separate_labels(figure: Any, labels: list[Any]) -> None:
    """Keep the labels of points at the same or nearby positions from being drawn over each other, in the saved
    figure too.

    Each round lays the figure out (constrained layout makes room for the labels where they are, which can shrink
    the axes and bring labels that were apart together again) and moves overlapping labels down. Then the layout is
    frozen, so that ``savefig`` draws the axes where the labels were separated rather than laying them out again.
    """
    for _ in range(_LAYOUT_ROUNDS):
        figure.draw_without_rendering()
        if not _move_overlapping_labels(figure, labels):
            break
    figure.set_layout_engine("none")


def _figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _log_scale(axes: Any, which: str) -> None:
    """Log scale on axis ``which`` ("x"/"y") with plain-number labels (``20000``, ``2.5``) rather than ``2×10^4``."""
    from matplotlib.ticker import LogFormatter

    getattr(axes, f"set_{which}scale")("log")
    axis = getattr(axes, f"{which}axis")
    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _note_no_data(axes: Any) -> None:
    axes.text(0.5, 0.5, "no measurements yet", ha="center", va="center", transform=axes.transAxes, color="gray")


def _finite_points(raw: Any) -> list[tuple[float, float]]:
    """The well-formed, finite ``[x, y]`` pairs of a stored curve."""
    return [
        (float(p[0]), float(p[1]))
        for p in (raw if isinstance(raw, list) else [])
        if isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
        and math.isfinite(p[0]) and math.isfinite(p[1])
    ]


class Plot(Spec):
    """Base of all plot specs; each has a ``name`` (the PNG's file stem) and a ``title``."""

    name: str
    title: str

    def _check_common(self) -> None:
        owner = f"{type(self).__name__} {self.name!r}"
        check_name(owner, "name", self.name)
        if not _FILE_STEM.match(self.name):
            raise ValueError(
                f"{owner}: name is used as the PNG file name, so it may contain only letters, digits, '_', '-' and "
                f"'.', starting with a letter or digit; got {self.name!r}."
            )
        if not isinstance(self.title, str):
            raise ValueError(f"{owner}: title must be a string, got {self.title!r}.")

    @property
    def filename(self) -> str:
        """File name of the rendered PNG inside the run directory."""
        return f"{self.name}.png"

    def figure(self, results: dict[str, Any]) -> Any:
        """The plot drawn from ``results``: a matplotlib ``Figure``, laid out as `render_png` saves it."""
        raise NotImplementedError

    def render_png(self, results: dict[str, Any]) -> bytes:
        """Draw the plot from ``results`` and return PNG bytes."""
        return _figure_png(self.figure(results))

    def caption(self, results: dict[str, Any]) -> str:
        """One line of text shown under the plot in the report ('' when there is nothing to add)."""
        raise NotImplementedError


@dataclass
class CurvePlot(Plot):
    """Mean of curve ``curve`` over seeds for each arm (all arms, or ``arms`` in that order), with a min–max band.

    The x axis is the step, or, with ``x_curve``, the mean over seeds of another curve logged at the same steps
    (e.g. cumulative training FLOPs), labelled ``xlabel``.
    """

    kind: ClassVar[str] = "curve"

    name: str
    curve: str
    title: str
    ylabel: str
    arms: list[str] | None = None
    logy: bool = False
    x_curve: str | None = None  # plot against another recorded curve (e.g. cumulative FLOPs) instead of the step
    xlabel: str = "step"  # a curve's x need not be the training step (e.g. loops at test time, shift size)
    logx: bool = False

    def __post_init__(self) -> None:
        self._check_common()
        owner = f"CurvePlot {self.name!r}"
        if not isinstance(self.xlabel, str):
            raise ValueError(f"{owner}: xlabel must be a string, got {self.xlabel!r}.")
        check_name(owner, "curve", self.curve)
        if not isinstance(self.ylabel, str):
            raise ValueError(f"{owner}: ylabel must be a string, got {self.ylabel!r}.")
        if self.arms is not None:
            self.arms = check_name_list(owner, "arms (None for all arms)", self.arms, minimum=1)
        for flag in ("logx", "logy"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{owner}: {flag} must be True or False, got {getattr(self, flag)!r}.")
        if self.x_curve is not None:
            check_name(owner, "x_curve", self.x_curve)

    def _arm_curves(self, results: dict[str, Any], arm: str) -> tuple[list[list[tuple[float, float, float]]], bool]:
        """The arm's curves as (step, x, y) points (finite only) from complete and partial runs, and whether any run
        was partial."""
        runs = _arm_data(results, arm).get("runs")
        curves: list[list[tuple[float, float, float]]] = []
        any_partial = False
        for run in runs.values() if isinstance(runs, dict) else []:
            if not isinstance(run, dict) or run.get("status") not in _CURVE_STATUSES:
                continue
            run_curves = run.get("curves")
            raw = run_curves.get(self.curve) if isinstance(run_curves, dict) else None
            points = [(step, step, value) for step, value in _finite_points(raw)]
            if self.x_curve is not None:  # x from the other curve at the same step; steps it lacks are dropped
                x_at = dict(_finite_points(run_curves.get(self.x_curve) if isinstance(run_curves, dict) else None))
                points = [(step, x_at[step], value) for step, _, value in points if step in x_at]
            if points:
                curves.append(points)
                any_partial = any_partial or run.get("status") == "partial"
        return curves, any_partial

    def _missing_arms(self, results: dict[str, Any]) -> list[str]:
        return [arm for arm in _selected_arms(results, self.arms) if not self._arm_curves(results, arm)[0]]

    def figure(self, results: dict[str, Any]) -> Any:
        """Mean line and min–max band per arm against step (or the mean of ``x_curve``)."""
        figure, axes = _new_figure()
        drawn = 0
        for arm in _selected_arms(results, self.arms):
            curves, any_partial = self._arm_curves(results, arm)
            if not curves:
                continue
            by_step: dict[float, list[float]] = {}
            x_by_step: dict[float, list[float]] = {}
            for curve in curves:
                for step, x_value, value in curve:
                    by_step.setdefault(step, []).append(value)
                    x_by_step.setdefault(step, []).append(x_value)
            steps = sorted(by_step)
            xs = [math.fsum(x_by_step[s]) / len(x_by_step[s]) for s in steps]
            means = [math.fsum(by_step[s]) / len(by_step[s]) for s in steps]
            label = f"{_arm_label(results, arm)} (n={len(curves)}{', incl. partial' if any_partial else ''})"
            (line,) = axes.plot(xs, means, label=label)
            axes.fill_between(
                xs, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                color=line.get_color(), alpha=0.2, linewidth=0,
            )
            drawn += 1
        if drawn:
            axes.legend(fontsize="small")
            if self.logy:
                _log_scale(axes, "y")
            if self.logx:
                _log_scale(axes, "x")
        else:
            _note_no_data(axes)
        axes.set_title(self.title)
        axes.set_xlabel(self.xlabel)
        axes.set_ylabel(self.ylabel)
        axes.grid(True, alpha=0.3)
        return figure

    def caption(self, results: dict[str, Any]) -> str:
        """Which arms have no curve yet, if any."""
        missing = self._missing_arms(results)
        return f"No `{self.curve}` curve yet for: {', '.join(missing)}." if missing else ""


@dataclass
class MetricPlot(Plot):
    """One point per arm: x = the arm's ``params`` (``x="params"``), its ``info[x]``, or else the mean over complete
    seeds of final metric ``x``; y = mean ± std over complete seeds of final metric ``y``.

    ``fit="power_law"`` fits y = a·x^(−α) to the arm means in log-log space and states α in the legend.
    """

    kind: ClassVar[str] = "metric"

    name: str
    x: str
    y: str
    title: str
    logx: bool = False
    logy: bool = False
    fit: str | None = None
    arms: list[str] | None = None

    def __post_init__(self) -> None:
        self._check_common()
        owner = f"MetricPlot {self.name!r}"
        check_name(owner, "x", self.x)
        check_name(owner, "y", self.y)
        for flag in ("logx", "logy"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{owner}: {flag} must be True or False, got {getattr(self, flag)!r}.")
        if self.fit is not None:
            check_choice(owner, "fit", self.fit, _FIT_KINDS)
        if self.arms is not None:
            self.arms = check_name_list(owner, "arms (None for all arms)", self.arms, minimum=1)

    def points(self, results: dict[str, Any]) -> tuple[list[tuple[str, float, float, float]], list[str]]:
        """``([(arm, x, mean y, std y), ...], [arms not measured])`` over complete, finite runs."""
        points: list[tuple[str, float, float, float]] = []
        missing: list[str] = []
        for arm in _selected_arms(results, self.arms):
            data = _arm_data(results, arm)
            info = data.get("info") if isinstance(data.get("info"), dict) else {}
            if self.x == "params":
                x_value = data.get("params")
            elif self.x in info:
                x_value = info[self.x]
            else:
                x_values = _finite_metric_values(results, arm, self.x)
                x_value = mean_interval(x_values).mean if x_values else None
            y_values = _finite_metric_values(results, arm, self.y)
            if not isinstance(x_value, (int, float)) or isinstance(x_value, bool) or not y_values:
                missing.append(arm)
                continue
            summary = mean_interval(y_values)
            points.append((arm, float(x_value), summary.mean, summary.std if summary.n > 1 else 0.0))
        return points, missing

    def power_law(self, results: dict[str, Any]) -> tuple[float, float] | None:
        """``(a, alpha)`` fitted on the arm means when ``fit="power_law"`` and the points allow it, else None."""
        if self.fit != "power_law":
            return None
        points, _ = self.points(results)
        usable = [(x, y) for _, x, y, _ in points if x > 0 and y > 0]
        if len(usable) < 2 or len({x for x, _ in usable}) < 2:
            return None
        return fit_power_law([x for x, _ in usable], [y for _, y in usable])

    def figure(self, results: dict[str, Any]) -> Any:
        """Error-bar points per arm, labelled, plus the fitted power law when requested."""
        figure, axes = _new_figure()
        points, _ = self.points(results)
        if points:
            axes.errorbar(
                [p[1] for p in points], [p[2] for p in points], yerr=[p[3] for p in points],
                fmt="o", capsize=3, label=f"{self.y} (mean ± std over seeds)",
            )
            labels = [axes.annotate(_arm_label(results, arm), (x_value, y_value), textcoords="offset points",
                                    xytext=(4, 4), fontsize="x-small") for arm, x_value, y_value, _ in points]
            fitted = self.power_law(results)
            if fitted is not None:
                a, alpha = fitted
                xs = [p[1] for p in points if p[1] > 0]
                low, high = math.log(min(xs)), math.log(max(xs))
                grid = [math.exp(low + (high - low) * i / 63) for i in range(64)]
                axes.plot(grid, [a * g ** (-alpha) for g in grid], "--",
                          label=f"fit y = a·x^(−α), α = {format_number(alpha, 3)}")
            axes.legend(fontsize="small")
            if self.logx:
                _log_scale(axes, "x")
            if self.logy:
                _log_scale(axes, "y")
        else:
            _note_no_data(axes)
        axes.set_title(self.title)
        axes.set_xlabel(self.x)
        axes.set_ylabel(self.y)
        axes.grid(True, alpha=0.3)
        if points:
            _separate_labels(figure, labels)
        return figure

    def caption(self, results: dict[str, Any]) -> str:
        """The fitted exponent (when fitting) and which arms are not measured."""
        parts = []
        if self.fit == "power_law":
            fitted = self.power_law(results)
            if fitted is None:
                parts.append("Power-law fit needs ≥ 2 arms with distinct positive x and positive y.")
            else:
                a, alpha = fitted
                law = f"{self.y} ≈ {format_number(a, 3)}·{self.x}^(−{format_number(alpha, 3)})"
                parts.append(f"Power-law fit on arm means: {law}.")
        _, missing = self.points(results)
        if missing:
            parts.append(f"Not measured: {', '.join(missing)}.")
        return " ".join(parts)


@dataclass
class HeatmapPlot(Plot):
    """One heatmap per arm of a square matrix each run stores in its curves under ``matrix`` (as a list of rows,
    e.g. layer-by-layer weight similarity), averaged over the complete runs of the arm; one shared colour scale
    from ``vmin`` to ``vmax``."""

    kind: ClassVar[str] = "heatmap"

    name: str
    matrix: str
    title: str
    arms: list[str] | None = None
    vmin: float = -1.0
    vmax: float = 1.0
    label: str = ""

    def __post_init__(self) -> None:
        self._check_common()
        owner = f"HeatmapPlot {self.name!r}"
        check_name(owner, "matrix", self.matrix)
        if self.arms is not None:
            self.arms = check_name_list(owner, "arms (None for all arms)", self.arms, minimum=1)
        for bound in ("vmin", "vmax"):
            value = getattr(self, bound)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{owner}: {bound} must be a finite number, got {value!r}.")
        if not self.vmin < self.vmax:
            raise ValueError(f"{owner}: vmin={self.vmin} must be below vmax={self.vmax}.")

    def mean_matrix(self, results: dict[str, Any], arm: str) -> list[list[float]] | None:
        """The element-wise mean of the arm's complete runs' matrices (same shape, finite), or None."""
        runs = _arm_data(results, arm).get("runs")
        matrices = []
        for run in runs.values() if isinstance(runs, dict) else []:
            if not isinstance(run, dict) or run.get("status") != "complete" or not isinstance(run.get("curves"), dict):
                continue
            rows = run["curves"].get(self.matrix)
            if (isinstance(rows, list) and rows and all(isinstance(r, list) and len(r) == len(rows) for r in rows)
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for r in rows for v in r)):
                matrices.append(rows)
        shapes = {len(m) for m in matrices}
        if not matrices or len(shapes) != 1:
            return None
        size = shapes.pop()
        return [[math.fsum(m[i][j] for m in matrices) / len(matrices) for j in range(size)] for i in range(size)]

    def figure(self, results: dict[str, Any]) -> Any:
        """A row of heatmaps, one per arm with a measured matrix, and a shared colour bar."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        drawn = [(arm, m) for arm in _selected_arms(results, self.arms)
                 if (m := self.mean_matrix(results, arm)) is not None]
        figure = Figure(figsize=(2.2 + 2.6 * max(1, len(drawn)), 3.8), dpi=100, layout="constrained")
        if not drawn:
            _note_no_data(figure.add_subplot())
            return figure
        axes = figure.subplots(1, len(drawn), squeeze=False)[0]
        image = None
        for ax, (arm, matrix) in zip(axes, drawn, strict=True):
            image = ax.imshow(matrix, vmin=self.vmin, vmax=self.vmax, cmap="viridis")
            ax.set_title(_arm_label(results, arm).replace(" (", "\n("), fontsize="x-small")  # long labels: 2 lines
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(MaxNLocator(integer=True))  # rows and columns are indices: no 0.5 ticks
        figure.colorbar(image, ax=list(axes), label=self.label or self.matrix)
        figure.suptitle(self.title)
        return figure

    def caption(self, results: dict[str, Any]) -> str:
        """The mean off-diagonal entry per arm, and which arms have no matrix."""
        parts, missing = [], []
        for arm in _selected_arms(results, self.arms):
            matrix = self.mean_matrix(results, arm)
            if matrix is None:
                missing.append(arm)
            elif len(matrix) > 1:
                n = len(matrix)
                off = math.fsum(matrix[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
                parts.append(f"{arm} {format_number(off, 3)}")
        text = f"Mean off-diagonal {self.matrix}: {', '.join(parts)}." if parts else ""
        if missing:
            text += f" Not measured: {', '.join(missing)}."
        return text.strip()


_PLOT_KINDS: dict[str, type[Spec]] = {cls.kind: cls for cls in (CurvePlot, MetricPlot, HeatmapPlot)}


def plot_from_dict(data: dict[str, Any]) -> Plot:
    """Rebuild a plot spec from ``plot.to_dict()``, dispatching on its ``kind`` (curve, metric, heatmap)."""
    plot = spec_from_dict(data, _PLOT_KINDS, "plot")
    assert isinstance(plot, Plot)
    return plot
