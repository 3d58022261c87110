"""A window's drift report for people: one self-contained HTML page and a figure of effect sizes per feature."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipelines.monitoring.drift import DriftReport  # noqa: E402

METHOD_LABELS = {
    "wasserstein": "normed Wasserstein distance (reference stds)",
    "jensen_shannon": "Jensen-Shannon distance (reference bins)",
    "psi": "PSI (reference bins)",
}


def _plain_label(text: str) -> str:
    # A '$' in a feature name would start matplotlib's mathtext (and an odd count raises): show it as is.
    return text.replace("$", r"\$")


def effect_size_figure(report: DriftReport, *, title: str | None = None) -> Figure:
    """One panel per deciding effect size: a bar per feature (red when it drifted), the threshold as a line."""
    methods = report.thresholds.methods
    names = [f.feature for f in report.features]
    height = max(2.2, 0.32 * len(names) + 1.2)
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), height), squeeze=False, sharey=True)
    ys = list(range(len(names)))
    for ax, method in zip(axes[0], methods, strict=True):
        values = [getattr(f, method) for f in report.features]
        shown = [v if math.isfinite(v) else 0.0 for v in values]
        limit = report.thresholds.threshold(method)
        colors = [
            "tab:red"
            if f.drifted and v > limit
            else ("lightgray" if f.status in ("too few rows", "no reference", "absent") else "tab:blue")
            for f, v in zip(report.features, shown, strict=True)
        ]
        ax.barh(ys, shown, color=colors)
        ax.axvline(limit, color="black", linestyle="--", linewidth=1, label=f"threshold {limit:g}")
        ax.set_xlabel(METHOD_LABELS[method])
        ax.set_xlim(0, max([limit * 1.5, *shown]) * 1.05)
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].invert_yaxis()  # the first feature on top (the panels share the axis: invert once)
    axes[0][0].set_yticks(ys, [_plain_label(n) for n in names])
    verdict = "DATASET DRIFT" if report.dataset_drift else "no dataset drift"
    if not report.enough_rows:
        verdict = "too few rows"
    heading = f"{title}: " if title else ""
    fig.suptitle(_plain_label(f"{heading}{verdict} ({report.drifted_share:.0%} of features, {report.n_rows:,} rows)"))
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (and closed, so a long-running worker doesn't keep figures alive)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _cell(value: object, digits: int = 3, css: str = "") -> str:
    cls = f' class="{html.escape(css)}"' if css else ""
    return f"<td{cls}>{html.escape(_fmt(value, digits))}</td>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name { text-align: left; font-family: monospace; }
td.drift { background: #fbd5d5; font-weight: bold; } td.ok { background: #dff3df; }
td.muted { color: #888; } .verdict { font-size: 1.2em; padding: 0.4em; display: inline-block; }
.alarm { background: #c62828; color: white; } .calm { background: #2e7d32; color: white; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; }
"""


PERFORMANCE_ROWS = (
    ("labelled rows", "labelled_rows"),
    ("positive rows", "positives"),
    ("flagged rows", "flagged"),
    ("true positives", "true_positives"),
    ("false positives", "false_positives"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("F1", "f1"),
    ("anomaly events", "events"),
    ("events caught", "events_caught"),
    ("event recall", "event_recall"),
    ("false alarms per 1,000 rows", "false_alarms_per_1000"),
)


def _performance_section(perf: Mapping[str, object]) -> list[str]:
    """The served flags against the labels: the source and counts, or a plain "no labels" (never zeros)."""
    e = html.escape
    source = str(perf.get("source") or "no labels")
    parts = ["<h2>Performance against labels</h2>"]
    if source == "no labels" or not perf.get("labelled_rows"):
        parts.append(
            f"<p><b>No labels</b> for this window: {e(str(perf.get('note') or 'performance not measured'))}.</p>"
        )
        return parts
    parts.append(
        f"<p>Labels from <b>{e(source)}</b>; flags from {e(str(perf.get('flags_from') or '-'))}. An anomaly event "
        "is a run of consecutive positive-labelled rows of one device; it is caught when any of its rows is "
        "flagged. A metric whose denominator is empty is shown as &ndash;.</p>"
    )
    if perf.get("note"):
        parts.append(f"<p>{e(str(perf['note']))}</p>")
    parts.append("<table><tbody>")
    for label, key in PERFORMANCE_ROWS:
        value = perf.get(key)
        parts.append(f"<tr>{_cell(label, css='name')}{_cell(math.nan if value is None else value)}</tr>")
    parts.append("</tbody></table>")
    return parts


def render_html(
    report: DriftReport,
    *,
    title: str,
    context: Mapping[str, object] | None = None,
    history: Sequence[tuple[str, bool]] | None = None,
    alarm: bool | None = None,
    figure: bytes | None = None,
    performance: Mapping[str, object] | None = None,
) -> str:
    """A self-contained HTML page: verdict, context (dataset, model version, window...), the performance
    against labels (:func:`pipelines.monitoring.performance.window_performance`), the per-feature table,
    the recent windows' verdicts and the figure (PNG embedded). Every value is HTML-escaped."""
    e = html.escape
    t = report.thresholds
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if alarm is not None:
        css, text = ("alarm", "ALARM: drift persists") if alarm else ("calm", "no alarm")
        parts.append(f'<p class="verdict {css}">{e(text)}</p>')
    verdict = "dataset drift" if report.dataset_drift else "no dataset drift"
    if not report.enough_rows:
        verdict = f"not judged: {report.n_rows:,} rows < {t.min_rows:,}"
    parts.append(
        f"<p>This window: <b>{e(verdict)}</b>, {e(_fmt(report.drifted_share, 2))} of the features drifted "
        f"(dataset drift at &ge; {e(_fmt(t.drift_share, 2))}), {e(_fmt(report.n_rows))} rows.</p>"
    )
    if context:
        parts.append("<dl>")
        parts.extend(f"<dt>{e(str(k))}</dt><dd>{e(_fmt(v))}</dd>" for k, v in context.items())
        parts.append("</dl>")
    if performance is not None:
        parts.extend(_performance_section(performance))
    deciding = ", ".join(f"{m} > {t.threshold(m):g}" for m in t.methods)
    parts.append(
        f"<p>A feature drifts when {e(deciding)} (effect sizes, not p-values), or its missing share moves by "
        f"more than {e(f'{t.missing_share:g}')}, in a window of at least {e(f'{t.min_rows:,}')} rows.</p>"
    )
    header = [
        "feature", "status", "rows (ref)", "rows (window)", "missing (ref)", "missing (window)",
        "mean (ref)", "mean (window)", "std (ref)", "std (window)",
        "Wasserstein", "Jensen-Shannon", "PSI", "why",
    ]  # fmt: skip
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for f in report.features:
        status_css = {"drift": "drift", "ok": "ok"}.get(f.status, "muted")
        effect_css = {m: ("drift" if f.drifted and any(r.startswith(m) for r in f.reasons) else "") for m in t.methods}
        parts.append(
            "<tr>"
            + _cell(f.feature, css="name")
            + _cell(f.status, css=status_css)
            + _cell(f.n_reference)
            + _cell(f.n_current)
            + _cell(f.missing_share_reference)
            + _cell(f.missing_share_current)
            + _cell(f.mean_reference, 4)
            + _cell(f.mean_current, 4)
            + _cell(f.std_reference, 4)
            + _cell(f.std_current, 4)
            + _cell(f.wasserstein, css=effect_css.get("wasserstein", ""))
            + _cell(f.jensen_shannon, css=effect_css.get("jensen_shannon", ""))
            + _cell(f.psi, css=effect_css.get("psi", ""))
            + _cell("; ".join(f.reasons), css="name")
            + "</tr>"
        )
    parts.append("</tbody></table>")
    if history:
        parts.append("<h2>Recent windows</h2><table><thead><tr><th>window</th><th>dataset drift</th></tr></thead>")
        parts.append("<tbody>")
        for label, drifted in history:
            verdict_css = "drift" if drifted else "ok"
            parts.append(f"<tr>{_cell(label, css='name')}{_cell(verdict_css, css=verdict_css)}</tr>")
        parts.append("</tbody></table>")
    if figure:
        data = base64.b64encode(figure).decode("ascii")
        parts.append(f'<h2>Effect sizes</h2><img alt="effect sizes per feature" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts)
