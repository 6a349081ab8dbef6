"""The eval report: a summary table of every variant, then one section per variant with its
per-frame plots and a strip of source frames above its output frames.

    render_html(report)       one self-contained HTML page (plots as base64 PNG, no links out)
    render_markdown(report)   the same as markdown plus the PNG files it names
    write_report(report, p)   writes either, chosen by the suffix of ``p`` (.html or .md)

Plots are drawn with matplotlib (the ``eval`` extra), through ``matplotlib.figure.Figure``
only: no pyplot, no global backend, safe beside other threads.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.offline.quality import (
    CANNY_THRESHOLDS,
    EDGE_BLUR,
    EDGE_TOLERANCE,
    ClipConsistency,
    ClipQuality,
)

#: Frames shown per strip.
STRIP_FRAMES = 6
REPORT_SUFFIXES = (".html", ".md")


@dataclass(frozen=True)
class VariantReport:
    """One variant's figures and its frames at the report's strip indices."""

    name: str
    quality: ClipQuality
    strip: Sequence[np.ndarray]
    description: str = ""
    fps: float | None = None
    ff_pass_rate: float | None = None
    clip: ClipConsistency | None = None


@dataclass(frozen=True)
class Report:
    title: str
    source_mad: np.ndarray  #: the source's own consecutive-frame MAD, for scale
    strip_indices: Sequence[int]  #: the frames the strips show (see :func:`sample_indices`)
    source_strip: Sequence[np.ndarray]  #: the source at those frames, at the output size
    variants: Sequence[VariantReport]
    settings: dict[str, str] = field(default_factory=dict)  #: shown under the title
    notes: Sequence[str] = ()
    skip: int = 0  #: warm-up frames left out of the means (greyed in the plots)


# --------------------------------------------------------------------------- numbers
def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pulse(q: ClipQuality) -> float | None:
    if q.mad_after_update is None or not q.mad_other:
        return None
    return q.mad_after_update / q.mad_other


COLUMNS = (
    "variant",
    "MAD",
    "VBench flicker",
    "warp error",
    "edge F1",
    "MAD after update",
    "MAD other",
    "pulse",
    "FF pass",
    "CLIP",
    "fps",
)


def summary_rows(report: Report) -> list[list[str]]:
    """The summary table as text cells, one row per variant (columns: :data:`COLUMNS`)."""
    rows = []
    for v in report.variants:
        q = v.quality
        pulse = _pulse(q)
        rows.append(
            [
                v.name,
                _num(q.mad, 4),
                _num(q.flicker_score, 4),
                _num(q.warp_error, 4),
                _num(q.edge_f1, 3),
                _num(q.mad_after_update, 4),
                _num(q.mad_other, 4),
                "-" if pulse is None else f"{pulse:.2f}x",
                "-" if v.ff_pass_rate is None else f"{100 * v.ff_pass_rate:.1f}%",
                _num(v.clip.value if v.clip else None, 4),
                _num(v.fps, 1),
            ]
        )
    return rows


def text_table(report: Report) -> str:
    """The summary table as aligned plain text (what ``streamv2v eval`` prints)."""
    rows = [list(COLUMNS), *summary_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- pictures
def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(
            "the eval report draws its plots with matplotlib, which is not installed: "
            "pip install 'streamv2v[eval]'"
        ) from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _curves(ax, values: np.ndarray, skip: int, label: str, **style) -> None:
    x = np.arange(1, len(values) + 1)  # value i is the change into frame i + 1
    ax.plot(x, values, label=label, **style)
    if skip:
        ax.axvspan(0.5, skip + 0.5, color="0.9", zorder=0)


def variant_plot(report: Report, variant: VariantReport) -> bytes:
    """PNG: the variant's consecutive-frame MAD (frames right after a bank update marked) over
    the source's, its warp error and its structure (edge F1) per frame."""
    q = variant.quality
    panels = 1 + (q.warp_errors is not None) + (q.structure is not None)
    fig = _figure(8, 2.3 * panels)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    ax = axes[0]
    # The source on its own axis: a noisy camera's MAD can be 50x the output's.
    source_ax = ax.twinx()
    source_ax.plot(np.arange(1, len(report.source_mad) + 1), report.source_mad, color="0.65", lw=1)
    source_ax.set_ylabel("source MAD", color="0.5")
    source_ax.tick_params(axis="y", colors="0.5")
    _curves(ax, q.frame_mad, report.skip, variant.name, color="C0", lw=1.5)
    into = np.flatnonzero(q.after_update[1 : len(q.frame_mad) + 1])
    if len(into):
        ax.plot(into + 1, q.frame_mad[into], "o", color="C3", ms=4, label="after a bank update")
    ax.set_ylabel("MAD (0..255)")
    ax.set_title("change from the previous frame", fontsize=10, loc="left")
    ax.legend(fontsize=8, loc="upper right")
    if q.warp_errors is not None:
        ax = axes[1]
        _curves(ax, q.warp_errors, report.skip, variant.name, color="C2", lw=1.5)
        ax.set_ylabel("warp error (0..255)")
        ax.set_title("warp error against the source's flow", fontsize=10, loc="left")
    if q.structure is not None:
        _structure_axes(axes[-1], report.skip)
        axes[-1].plot(np.arange(len(q.structure)), q.structure, color="C4", lw=1.5)
    axes[-1].set_xlabel("frame")
    return _png(fig)


def _structure_axes(ax, skip: int) -> None:
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"edge F1 ({EDGE_TOLERANCE} px)")
    ax.set_title(
        f"structure: Canny edges within {EDGE_TOLERANCE} px of the source's (F1, 1 = all kept)",
        fontsize=10,
        loc="left",
    )
    if skip:
        ax.axvspan(-0.5, skip - 0.5, color="0.9", zorder=0)


def summary_plot(report: Report) -> bytes:
    """PNG: every variant's consecutive-frame MAD (and warp error, and structure) on one set of
    axes each."""
    has_warp = any(v.quality.warp_errors is not None for v in report.variants)
    has_structure = any(v.quality.structure is not None for v in report.variants)
    panels = 1 + has_warp + has_structure
    fig = _figure(8, 2.3 * panels)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    if has_structure:
        _structure_axes(axes[-1], report.skip)
    for i, v in enumerate(report.variants):
        _curves(axes[0], v.quality.frame_mad, report.skip if i == 0 else 0, v.name, lw=1.2)
        if has_warp and v.quality.warp_errors is not None:
            _curves(axes[1], v.quality.warp_errors, report.skip if i == 0 else 0, v.name, lw=1.2)
        if v.quality.structure is not None:
            s = v.quality.structure
            axes[-1].plot(np.arange(len(s)), s, label=v.name, lw=1.2, color=f"C{i}")
    axes[0].set_ylabel("MAD (0..255)")
    axes[0].set_title("change from the previous frame, every variant", fontsize=10, loc="left")
    axes[0].legend(fontsize=8, loc="upper right", ncol=min(4, len(report.variants)))
    if has_warp:
        axes[1].set_ylabel("warp error (0..255)")
        axes[1].set_title("warp error against the source's flow", fontsize=10, loc="left")
    axes[-1].set_xlabel("frame")
    return _png(fig)


def sample_indices(count: int, n: int = STRIP_FRAMES, start: int = 0) -> list[int]:
    """``n`` frame indices spread evenly over ``start..count-1`` (fewer if the clip is short)."""
    start = min(start, max(0, count - 1))
    n = max(1, min(n, count - start))
    return sorted(set(np.linspace(start, count - 1, n).round().astype(int).tolist()))


def frame_strip(rows: Sequence[tuple[str, Sequence[np.ndarray]]], indices: Sequence[int]) -> bytes:
    """PNG: one row of frames per (label, frames at ``indices``), one column per index."""
    h, w = rows[0][1][0].shape[:2]
    cell = 1.6
    fig = _figure(cell * len(indices) * w / h + 0.4, cell * len(rows) + 0.3)
    axes = fig.subplots(len(rows), len(indices), squeeze=False)
    for r, (label, clip) in enumerate(rows):
        for c, i in enumerate(indices):
            ax = axes[r, c]
            ax.imshow(clip[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {i}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    return _png(fig)


def _all_strips(report: Report) -> bytes:
    rows = [("source", report.source_strip), *((v.name, v.strip) for v in report.variants)]
    return frame_strip(rows, report.strip_indices)


def _strip(report: Report, variant: VariantReport) -> bytes:
    rows = [("source", report.source_strip), (variant.name, variant.strip)]
    return frame_strip(rows, report.strip_indices)


# --------------------------------------------------------------------------- documents
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.settings, .note { color: #555; }
section { border-top: 1px solid #ddd; margin-top: 1.5em; }
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(report.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(report.title)}</h1>",
    ]
    if report.settings:
        items = ", ".join(f"{e(k)}: {e(v)}" for k, v in report.settings.items())
        parts.append(f'<p class="settings">{items}</p>')
    parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in COLUMNS) + "</tr>")
    for row in summary_rows(report):
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    parts.append(f"<p class='note'>{e(_legend(report))}</p>")
    for note in report.notes:
        parts.append(f'<p class="note">{e(note)}</p>')
    parts.append(f'<img alt="all variants" src="{_data_uri(summary_plot(report))}">')
    parts.append(f'<img alt="frames of every variant" src="{_data_uri(_all_strips(report))}">')
    for v in report.variants:
        parts.append(f"<section><h2>{e(v.name)}</h2>")
        if v.description:
            parts.append(f"<p>{e(v.description)}</p>")
        if v.clip is not None and v.clip.value is None:
            parts.append(f'<p class="note">CLIP consistency {e(v.clip.note)}</p>')
        parts.append(
            f'<img alt="{e(v.name)} per frame" src="{_data_uri(variant_plot(report, v))}">'
        )
        strip = _strip(report, v)
        parts.append(f'<img alt="{e(v.name)} frames" src="{_data_uri(strip)}"></section>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _legend(report: Report) -> str:
    return (
        "MAD: mean absolute difference of consecutive frames (0..255, lower is steadier); "
        "VBench flicker: (255 - MAD) / 255; warp error: output frame t+1 warped onto t by the "
        "source's optical flow, mean absolute difference over non-occluded pixels (0..255); "
        f"edge F1: Canny edges (OpenCV, blur sigma {EDGE_BLUR:g}, thresholds "
        f"{CANNY_THRESHOLDS[0]}/{CANNY_THRESHOLDS[1]}) of each output frame against its source "
        f"frame's, F1 of precision (output edges within {EDGE_TOLERANCE} px of a source edge) "
        f"and recall (source edges within {EDGE_TOLERANCE} px of an output edge): 1 = every "
        "shape kept and nothing invented, near 0 = unrelated; "
        "pulse: MAD into frames right after a feature-bank update / MAD into the others; "
        "CLIP: mean cosine similarity of consecutive frames' CLIP image embeddings. "
        f"The first {report.skip} frame(s) (warm-up, shaded) are left out of the means."
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "variant"


def render_markdown(report: Report, stem: str) -> tuple[str, dict[str, bytes]]:
    """The report as markdown and the PNG files it links to (``stem``-prefixed names)."""
    files = {f"{stem}-summary.png": summary_plot(report), f"{stem}-frames.png": _all_strips(report)}
    lines = [f"# {report.title}", ""]
    if report.settings:
        lines += [", ".join(f"{k}: {v}" for k, v in report.settings.items()), ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(report)]
    lines += ["", _legend(report), "", *(f"{n}\n" for n in report.notes)]
    lines += [f"![all variants]({stem}-summary.png)", "", f"![frames]({stem}-frames.png)", ""]
    for v in report.variants:
        slug = _slug(v.name)
        plot, strip = f"{stem}-{slug}-plots.png", f"{stem}-{slug}-frames.png"
        files[plot] = variant_plot(report, v)
        files[strip] = _strip(report, v)
        lines += [f"## {v.name}", ""]
        if v.description:
            lines += [v.description, ""]
        lines += [f"![{v.name} per frame]({plot})", "", f"![{v.name} frames]({strip})", ""]
    return "\n".join(lines), files


def write_report(report: Report, path: Path) -> list[Path]:
    """Write the report to ``path`` (.html: one file; .md: the markdown and its PNGs beside it).
    Returns the files written."""
    path = Path(path)
    if path.suffix.lower() == ".html":
        path.write_text(render_html(report), encoding="utf-8")
        return [path]
    if path.suffix.lower() == ".md":
        text, files = render_markdown(report, path.stem)
        written = []
        for name, data in files.items():
            (path.parent / name).write_bytes(data)
            written.append(path.parent / name)
        path.write_text(text, encoding="utf-8")
        return [path, *written]
    raise ValueError(
        f"cannot write a report to {path}: use a .html (one self-contained page) or .md "
        "(markdown with PNG files beside it) file name"
    )
