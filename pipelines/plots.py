"""Evaluation figures for a training run: readings with predicted anomalies, PR curves, confusion matrix."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def readings_over_time(
    df: pd.DataFrame,
    predicted_anomaly: np.ndarray,
    *,
    value_col: str = "temp",
    max_devices: int = 4,
    unit: str | None = None,
    windows: list[tuple] | None = None,
) -> Figure:
    """One panel per device: the reading over time (with its unit), predicted anomalies in red, normal
    points in blue, and the known anomaly windows shaded where they are known."""
    predicted = np.asarray(predicted_anomaly, dtype=bool)
    frame = df[["device", "ts", value_col]].assign(_pred=predicted)
    devices = sorted(frame["device"].unique())[:max_devices]
    fig, axes = plt.subplots(len(devices), 1, figsize=(11, 2.4 * max(len(devices), 1)), squeeze=False)
    for ax, device in zip(axes[:, 0], devices, strict=False):
        d = frame[frame["device"] == device].sort_values("ts")
        normal, anomalous = d[~d["_pred"]], d[d["_pred"]]
        ax.plot(d["ts"], d[value_col], color="lightsteelblue", linewidth=0.6, zorder=1)
        ax.scatter(normal["ts"], normal[value_col], s=3, color="tab:blue", label="normal", zorder=2)
        ax.scatter(anomalous["ts"], anomalous[value_col], s=10, color="red", label="predicted anomaly", zorder=3)
        shown = False
        for lo, hi in windows or []:
            lo, hi = (
                pd.Timestamp(w).tz_localize("UTC") if pd.Timestamp(w).tzinfo is None else pd.Timestamp(w)
                for w in (lo, hi)
            )
            if len(d) and hi >= d["ts"].min() and lo <= d["ts"].max():
                ax.axvspan(lo, hi, color="orange", alpha=0.2, label=None if shown else "known anomaly window")
                shown = True
        label = f"{value_col} ({unit})" if unit else value_col
        ax.set_title(f"{device}: {label}", fontsize=9)
        ax.set_ylabel(label)
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig


def pr_curves(y_true: np.ndarray, curves: dict[str, np.ndarray]) -> Figure:
    """Precision-recall curve per scorer (e.g. the model and the temperature-threshold baseline)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y = np.asarray(y_true, dtype=int)
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, scores in curves.items():
        precision, recall, _ = precision_recall_curve(y, scores)
        ax.plot(recall, precision, label=f"{name} (AP={average_precision_score(y, scores):.3f})")
    ax.axhline(y.mean() if len(y) else 0.0, color="grey", linestyle=":", label="prevalence")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Precision-recall on the held-out test range")
    fig.tight_layout()
    return fig


def confusion_matrix_figure(y_true: np.ndarray, y_pred: np.ndarray) -> Figure:
    """2x2 confusion matrix with counts, rows = truth, columns = prediction."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int), labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, str(count), ha="center", va="center", color="black")
    ax.set_xticks([0, 1], ["normal", "anomaly"])
    ax.set_yticks([0, 1], ["normal", "anomaly"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
