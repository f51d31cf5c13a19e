"""The report's charts as inline SVG (engine/report.py gathers their figures): axes with round ticks,
stacked bars, lines and a scatter, each an <svg class="chart"> with its title, axis labels and legend.
Plain SVG and CSS classes the page's template styles: nothing to load when the page opens."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

SPLITS = ("train", "val", "test")

W, H = 680, 300
PAD = {"left": 64, "right": 20, "top": 48, "bottom": 56}
COLOURS = {"train": "#4c78a8", "val": "#72b7b2", "test": "#f58518", "kept": "#4c78a8", "rejected": "#e45756",
           "made": "#bab0ac", "teacher": "#e45756", "student": "#4c78a8", "band": "#fdf0c2", "quota": "#222"}
SERIES = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#ff9da6", "#72b7b2"]


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:.3g}"


def svg(chart_id: str, title: str, body: str, x_label: str, y_label: str, *, width: int = W, height: int = H,
        legend: list[tuple[str, str]] = ()) -> str:
    """A chart: its title, axis labels and legend around `body`."""
    items, x = [], PAD["left"]
    for name, colour in legend:  # one row under the title, left to right
        items.append(f'<rect x="{x}" y="{PAD["top"] - 16}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{PAD["top"] - 7}" class="legend">{esc(name)}</text>')
        x += 24 + 6 * len(name)
    return (f'<svg id="{chart_id}" class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<title>{esc(title)}</title><text x="{PAD["left"]}" y="18" class="title">{esc(title)}</text>{"".join(items)}'
            f'{body}<text x="{(PAD["left"] + width - PAD["right"]) / 2}" y="{height - 10}" class="axis-label" '
            f'text-anchor="middle">{esc(x_label)}</text><text transform="translate(16 {(PAD["top"] + height - PAD["bottom"]) / 2})'
            f' rotate(-90)" class="axis-label" text-anchor="middle">{esc(y_label)}</text></svg>')


@dataclass
class Frame:
    """The plotting area and its linear scales."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int = W
    height: int = H

    @property
    def left(self):
        return PAD["left"]

    @property
    def right(self):
        return self.width - PAD["right"]

    @property
    def top(self):
        return PAD["top"]

    @property
    def bottom(self):
        return self.height - PAD["bottom"]

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / ((self.x1 - self.x0) or 1) * (self.right - self.left)

    def y(self, v: float) -> float:
        return self.bottom - (v - self.y0) / ((self.y1 - self.y0) or 1) * (self.bottom - self.top)

    def y_axis(self, fmt_tick=fmt) -> str:
        parts = [f'<line x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{self.bottom}" class="axis"/>']
        for t in nice_ticks(self.y0, self.y1):
            if self.y0 - 1e-9 <= t <= self.y1 + 1e-9:
                y = self.y(t)
                parts.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.right}" y2="{y:.1f}" class="grid"/>'
                             f'<text x="{self.left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{fmt_tick(t)}</text>')
        return "".join(parts)

    def x_axis(self, fmt_tick=fmt) -> str:
        parts = [f'<line x1="{self.left}" y1="{self.bottom}" x2="{self.right}" y2="{self.bottom}" class="axis"/>']
        for t in nice_ticks(self.x0, self.x1, 6):
            if self.x0 - 1e-9 <= t <= self.x1 + 1e-9:
                x = self.x(t)
                parts.append(f'<line x1="{x:.1f}" y1="{self.bottom}" x2="{x:.1f}" y2="{self.bottom + 4}" class="axis"/>'
                             f'<text x="{x:.1f}" y="{self.bottom + 17}" class="tick" text-anchor="middle">{fmt_tick(t)}</text>')
        return "".join(parts)


def stacked_bars(chart_id: str, title: str, groups: list[str], stacks: dict[str, list[float]], x_label: str,
                 y_label: str, markers: list[float | None] | None = None, marker_name: str = "") -> str:
    """Vertical bars, one per group, each stacked from `stacks` (name -> value per group); an optional
    horizontal marker per group (a quota)."""
    totals = [sum(s[i] for s in stacks.values()) for i in range(len(groups))]
    top = max([*totals, *(m for m in markers or [] if m is not None), 1])
    f = Frame(0, len(groups), 0, top * 1.1)
    slot = (f.right - f.left) / max(len(groups), 1)
    bar = min(slot * 0.7, 60)
    parts = [f.y_axis(), f'<line x1="{f.left}" y1="{f.bottom}" x2="{f.right}" y2="{f.bottom}" class="axis"/>']
    for i, group in enumerate(groups):
        x = f.left + slot * i + (slot - bar) / 2
        base = 0.0
        for name, values in stacks.items():
            v = values[i]
            if v:
                parts.append(f'<rect x="{x:.1f}" y="{f.y(base + v):.1f}" width="{bar:.1f}" height="{f.y(base) - f.y(base + v):.1f}"'
                             f' fill="{COLOURS.get(name, SERIES[list(stacks).index(name) % len(SERIES)])}" class="bar">'
                             f'<title>{esc(group)} · {esc(name)}: {fmt(v)}</title></rect>')
            base += v
        marker = markers[i] if markers else None
        if marker is not None:
            parts.append(f'<line x1="{x - 4:.1f}" y1="{f.y(marker):.1f}" x2="{x + bar + 4:.1f}" y2="{f.y(marker):.1f}"'
                         f' class="marker"><title>{esc(group)} · {esc(marker_name)}: {fmt(marker)}</title></line>')
        label = group if len(group) <= 16 else group[:15] + "…"
        parts.append(f'<text x="{x + bar / 2:.1f}" y="{f.bottom + 16}" class="tick" text-anchor="middle">{esc(label)}</text>')
    legend = [(n, COLOURS.get(n, SERIES[k % len(SERIES)])) for k, n in enumerate(stacks)]
    if markers and any(m is not None for m in markers):
        legend.append((marker_name, COLOURS["quota"]))
    return svg(chart_id, title, "".join(parts), x_label, y_label, legend=legend)


def coverage_chart(rows: list[dict]) -> str:
    return stacked_bars("chart-coverage", "Rows per category against its quota", [r["category"] for r in rows],
                        {s: [r[s] for r in rows] for s in SPLITS}, "category", "rows",
                        markers=[r["quota"] for r in rows], marker_name="quota (train+val)")


def funnel_chart(rows: list[dict]) -> str:
    """Horizontal bars: rows left after each stage, with what it dropped (or added)."""
    height = PAD["top"] + 30 * len(rows) + PAD["bottom"]
    top = max([r["rows_out"] or 0 for r in rows] + [r["rows_in"] or 0 for r in rows] + [1])
    f = Frame(0, top * 1.25, 0, 1, height=height)
    parts = [f.x_axis()]
    for i, r in enumerate(rows):
        y = f.top + 30 * i + 5
        out = r["rows_out"] or 0
        parts.append(f'<text x="{f.left - 6}" y="{y + 14}" class="tick" text-anchor="end">{esc(r["stage"])}</text>'
                     f'<rect x="{f.left}" y="{y}" width="{f.x(out) - f.left:.1f}" height="20" fill="{COLOURS["kept"]}" class="bar">'
                     f'<title>{esc(r["stage"])}: {out} rows out of {r["rows_in"]}</title></rect>')
        if r["dropped"]:
            parts.append(f'<rect x="{f.x(out):.1f}" y="{y}" width="{f.x(out + r["dropped"]) - f.x(out):.1f}" height="20"'
                         f' fill="{COLOURS["rejected"]}" class="bar"><title>{esc(r["stage"])}: {r["dropped"]} dropped</title></rect>')
        added = (r["rows_out"] or 0) - (r["rows_in"] or 0)
        note = f"−{r['dropped']}" if r["dropped"] else (f"+{added}" if added > 0 else "")
        parts.append(f'<text x="{f.x(out + r["dropped"]) + 6:.1f}" y="{y + 14}" class="tick">{out}{" (" + note + ")" if note else ""}</text>')
    return svg("chart-funnel", "Rows through the stages", "".join(parts), "rows", "",
               height=height, legend=[("rows out", COLOURS["kept"]), ("dropped", COLOURS["rejected"])])


def histogram_chart(hist: dict) -> str:
    edges, kept, rejected = hist["edges"], hist["kept"], hist["rejected"]
    top = max([k + r for k, r in zip(kept, rejected)] + [1])
    f = Frame(edges[0], edges[-1], 0, top * 1.1)
    parts = []
    if hist["band"]:
        lo, hi = max(hist["band"][0], edges[0]), min(hist["band"][1], edges[-1])
        if hi > lo:
            parts.append(f'<rect x="{f.x(lo):.1f}" y="{f.top}" width="{f.x(hi) - f.x(lo):.1f}" height="{f.bottom - f.top}"'
                         f' fill="{COLOURS["band"]}" class="band"><title>mining band [{hist["band"][0]:.3g}, {hist["band"][1]:.3g}]</title></rect>')
    parts += [f.y_axis(), f.x_axis()]
    for i, (k, r) in enumerate(zip(kept, rejected)):
        x, w = f.x(edges[i]) + 1, f.x(edges[i + 1]) - f.x(edges[i]) - 2
        span = f"{edges[i]:.2f}–{edges[i + 1]:.2f}"
        for base, v, name in ((0, k, "kept"), (k, r, "rejected")):
            if v:
                parts.append(f'<rect x="{x:.1f}" y="{f.y(base + v):.1f}" width="{w:.1f}" height="{f.y(base) - f.y(base + v):.1f}"'
                             f' fill="{COLOURS[name]}" class="bar"><title>{span} · {name}: {v}</title></rect>')
    legend = [("kept", COLOURS["kept"]), ("dropped by mining", COLOURS["rejected"])]
    if hist["band"]:
        legend.insert(0, ("mining band", COLOURS["band"]))
    return svg("chart-confidence", f"Teacher confidence ({hist['measure']})", "".join(parts), hist["measure"], "rows",
               legend=legend)


def cluster_chart(rows: list[dict]) -> str:
    return stacked_bars("chart-clusters", "Rows per diversity cluster", [str(r["cluster"]) for r in rows],
                        {"rows": [r["n"] for r in rows]}, "cluster (largest first)", "rows")


def augmentation_chart(rows: list[dict]) -> str:
    """Grouped bars per template: made (where known) and kept."""
    groups = [r["template"] for r in rows]
    top = max([r["made"] or 0 for r in rows] + [r["kept"] for r in rows] + [1])
    f = Frame(0, len(groups), 0, top * 1.1)
    slot = (f.right - f.left) / max(len(groups), 1)
    bar = min(slot * 0.35, 40)
    parts = [f.y_axis(), f'<line x1="{f.left}" y1="{f.bottom}" x2="{f.right}" y2="{f.bottom}" class="axis"/>']
    for i, r in enumerate(rows):
        x = f.left + slot * i + slot / 2 - bar
        for j, name in enumerate(("made", "kept")):
            v = r[name]
            if v:
                parts.append(f'<rect x="{x + j * bar:.1f}" y="{f.y(v):.1f}" width="{bar:.1f}" height="{f.bottom - f.y(v):.1f}"'
                             f' fill="{COLOURS[name]}" class="bar"><title>{esc(r["template"])} · {name}: {v}</title></rect>')
        label = r["template"].split("#", 1)[-1]
        label = label if len(label) <= 22 else label[:21] + "…"
        parts.append(f'<text x="{x + bar:.1f}" y="{f.bottom + 16}" class="tick" text-anchor="middle">{esc(label)}</text>')
    return svg("chart-augmentation", "Yield per augmentation template", "".join(parts), "template", "rows",
               legend=[("made", COLOURS["made"]), ("kept", COLOURS["kept"])])


def lines_chart(chart_id: str, title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
                dotted: set[str] = frozenset()) -> str:
    """One line per series; a series in `dotted` is drawn as points joined by a dashed line."""
    points = [p for s in series.values() for p in s]
    xs, ys = [p[0] for p in points] or [0, 1], [p[1] for p in points] or [0, 1]
    f = Frame(min(0, min(xs)), max(xs) or 1, min(0, min(ys)), max(ys) * 1.08 or 1)
    parts = [f.y_axis(), f.x_axis()]
    legend = []
    for k, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        colour = SERIES[k % len(SERIES)]
        path = " ".join(f"{f.x(x):.1f},{f.y(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 4"' if name in dotted else ""
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash} class="line">'
                     f'<title>{esc(name)}</title></polyline>')
        if name in dotted or len(pts) == 1:
            parts += [f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="3.5" fill="{colour}" class="point">'
                      f'<title>{esc(name)} at {fmt(x)}: {y:.4g}</title></circle>' for x, y in pts]
        legend.append((name, colour))
    return svg(chart_id, title, "".join(parts), x_label, y_label, legend=legend)


def training_charts(students: list[dict]) -> list[str]:
    charts = []
    for i, s in enumerate(students):
        series = {"loss": s["loss"], **{f"{name}": pts for name, pts in s["components"].items()}, "val loss": s["val"]}
        charts.append(lines_chart(f"chart-training-{i}", f"Training of {s['student']}", series, "optimizer step",
                                  "loss", dotted={"val loss"}))
    return charts


def scatter_chart(models: list[dict]) -> str:
    """Accuracy against batch-1 decode speed, one point per model, its area proportional to parameters."""
    speeds = [m["decode_tok_s"] or 0 for m in models]
    biggest = max([m["params"] or 0 for m in models] + [1])
    f = Frame(0, max(speeds + [1]) * 1.15, 0, 1.05)
    parts = [f.y_axis(lambda t: f"{t:.0%}"), f.x_axis()]
    for m, speed in zip(models, speeds):
        r = 4 + 26 * math.sqrt((m["params"] or 0) / biggest)
        colour = COLOURS["teacher"] if m["kind"] == "teacher" else COLOURS["student"]
        acc = m["accuracy"] or 0
        parts.append(f'<circle cx="{f.x(speed):.1f}" cy="{f.y(acc):.1f}" r="{r:.1f}" fill="{colour}" fill-opacity="0.55"'
                     f' stroke="{colour}" class="point"><title>{esc(m["name"])}: {acc:.1%} at {speed:.1f} tok/s,'
                     f' {(m["params"] or 0) / 1e6:.1f}M params</title></circle>'
                     f'<text x="{f.x(speed) + r + 4:.1f}" y="{f.y(acc) + 4:.1f}" class="tick">{esc(m["name"])}</text>')
    return svg("chart-speed-accuracy", "Accuracy against decode speed (area ∝ parameters)", "".join(parts),
               "batch-1 decode tokens/s", "accuracy", legend=[("teacher", COLOURS["teacher"]), ("student", COLOURS["student"])])
