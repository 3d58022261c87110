"""A window's performance against ground truth: how the served alert flags compare with the labels that
have arrived, row by row and per anomaly event.

Two sources of labels, preferred in this order:

* **feedback**: labels posted to the scoring service's ``POST /feedback``, joined to the prediction log
  by request id and record index: the flags the service actually returned;
* **gold labels**: the ``is_anomaly`` of the window's gold rows (the contract's ``label`` column, where a
  delivery carries one: NAB, the simulator), beside the flags of the model version on those rows.

Everything here is pure (frames in, a dict out); :func:`pipelines.monitoring.loop.monitor_window` reads
the frames and records the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

FEEDBACK_SOURCE, GOLD_SOURCE, NO_LABELS = "feedback", "gold labels", "no labels"
LABEL = "is_anomaly"
KEY = ["request_id", "record_index"]
# the rows window_performance reads: device and time order the events; flagged and is_anomaly (0/1,
# <NA> where unknown) are compared
ROW_COLUMNS = ["device", "ts", "flagged", LABEL]
METRICS = ("precision", "recall", "f1", "event_recall", "false_alarms_per_1000")


def feedback_rows(predictions: pd.DataFrame, feedback: pd.DataFrame, version: str | None = None) -> pd.DataFrame:
    """The served predictions (of ``version`` when given) that have a feedback label, one row per record.

    A request id sent again is a new prediction: the record's latest prediction counts. A record
    labelled twice (the service refuses it, an older one did not): its latest label counts. Rows whose
    model call failed carry no flag and are left out."""
    if predictions.empty or feedback.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    served = predictions[predictions["served"].fillna(False).astype(bool) & predictions["flagged"].notna()]
    if version is not None:
        served = served[served["model_version"].astype(str) == str(version)]
    served = served.sort_values("ts", kind="stable").drop_duplicates(KEY, keep="last")
    labels = feedback.sort_values("ts", kind="stable").drop_duplicates(KEY, keep="last")[[*KEY, LABEL]]
    joined = served.merge(labels, on=KEY, how="inner")
    # records of one request share its time: the record index keeps them in the order they were sent
    joined = joined.sort_values(["ts", "request_id", "record_index"], kind="stable")
    return joined[ROW_COLUMNS].astype({"flagged": bool, LABEL: "Int8"}).reset_index(drop=True)


def gold_rows(features: pd.DataFrame, flagged: Any) -> pd.DataFrame:
    """The window's gold rows with the model's flag on each (``flagged`` in the rows' order, as
    :func:`pipelines.monitoring.loop.replay_outputs` returns it); ``is_anomaly`` <NA> where unknown."""
    if features.empty or LABEL not in features.columns:
        return pd.DataFrame(columns=ROW_COLUMNS)
    flags = np.asarray(flagged, dtype="float64")
    if len(flags) != len(features):
        raise ValueError(
            f"{len(features)} gold rows but {len(flags)} flags: pass the flags of these rows, in their order"
        )
    rows = features[["ts", LABEL]].astype({LABEL: "Int8"}).reset_index(drop=True)
    device = features["device"].astype(str).to_numpy() if "device" in features else "all"
    return rows.assign(device=device, flagged=flags >= 0.5)[ROW_COLUMNS]


def labelled_count(rows: pd.DataFrame) -> int:
    return 0 if rows.empty else int(rows[LABEL].notna().sum())


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def anomaly_events(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per anomaly event (``device``, ``rows``, ``caught``): a run of consecutive positive
    labelled rows of one device in time order (unlabelled rows are skipped, not counted as breaks);
    caught when any of its rows is flagged."""
    labelled = rows[rows[LABEL].notna()]
    if labelled.empty:
        return pd.DataFrame(columns=["device", "rows", "caught"])
    labelled = labelled.assign(_order=np.arange(len(labelled))).sort_values(["device", "ts", "_order"], kind="stable")
    positive = labelled[LABEL].astype(int).to_numpy() == 1
    device = labelled["device"].astype(str).to_numpy()
    new_device = np.r_[True, device[1:] != device[:-1]]
    starts = positive & (new_device | ~np.r_[False, positive[:-1]])
    event_id = np.cumsum(starts)
    events = pd.DataFrame(
        {"event": event_id[positive], "device": device[positive], "flagged": labelled["flagged"].to_numpy()[positive]}
    )
    grouped = events.groupby("event", sort=True)
    return pd.DataFrame(
        {
            "device": grouped["device"].first(),
            "rows": grouped.size(),
            "caught": grouped["flagged"].any().astype(bool),
        }
    ).reset_index(drop=True)


def performance(rows: pd.DataFrame) -> dict[str, Any]:
    """Row and event metrics of ``rows`` (:data:`ROW_COLUMNS`). A metric whose denominator is empty is
    None, never 0: precision without a flag, recall without a positive, event recall without an event."""
    labelled = rows[rows[LABEL].notna()] if not rows.empty else rows
    n = len(labelled)
    y = labelled[LABEL].astype(int).to_numpy() == 1 if n else np.zeros(0, dtype=bool)
    flags = labelled["flagged"].astype(bool).to_numpy() if n else np.zeros(0, dtype=bool)
    tp, fp = int((y & flags).sum()), int((~y & flags).sum())
    positives, flagged = int(y.sum()), int(flags.sum())
    precision, recall = _ratio(tp, flagged), _ratio(tp, positives)
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    events = anomaly_events(labelled)
    caught = int(events["caught"].sum()) if len(events) else 0
    return {
        "labelled_rows": n,
        "positives": positives,
        "flagged": flagged,
        "true_positives": tp,
        "false_positives": fp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "events": len(events),
        "events_caught": caught,
        "event_recall": _ratio(caught, len(events)),
        "false_alarms_per_1000": 1000.0 * fp / n if n else None,
    }


def window_performance(
    feedback: pd.DataFrame | None = None,
    gold: pd.DataFrame | None = None,
    *,
    gold_flags_from: str = "",
) -> dict[str, Any]:
    """The window's performance (pure): from the feedback-labelled predictions when any record of the
    window has feedback, else from the labelled gold rows, else ``source`` "no labels" and every metric
    None. ``feedback``: :func:`feedback_rows`; ``gold``: :func:`gold_rows`; ``gold_flags_from`` says where
    the gold rows' flags came from (for the report)."""
    feedback = feedback if feedback is not None else pd.DataFrame(columns=ROW_COLUMNS)
    gold = gold if gold is not None else pd.DataFrame(columns=ROW_COLUMNS)
    n_feedback, n_gold = labelled_count(feedback), labelled_count(gold)
    if n_feedback:
        out = {"source": FEEDBACK_SOURCE, "flags_from": "prediction log (served flags)", **performance(feedback)}
        if n_gold:
            out["note"] = f"feedback on {n_feedback:,} served records preferred over gold labels on {n_gold:,} rows"
        return out
    if n_gold:
        return {"source": GOLD_SOURCE, "flags_from": gold_flags_from or "model flags", **performance(gold)}
    return {
        "source": NO_LABELS,
        "flags_from": "",
        **dict.fromkeys(performance(pd.DataFrame(columns=ROW_COLUMNS))),
        "labelled_rows": 0,
        "note": "no feedback for the window's served records and no labelled gold rows: performance not measured",
    }


def performance_metrics(perf: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a window's performance (``perf_*``): only the measured ones (a metric not
    measured is absent, never 0); the labelled row count always."""
    out = {"perf_labelled_rows": float(perf.get("labelled_rows") or 0)}
    for key in ("positives", "events", "events_caught", *METRICS):
        value = perf.get(key)
        if value is not None and perf.get("source") != NO_LABELS:
            out[f"perf_{key}"] = float(value)
    return out


def describe(perf: dict[str, Any]) -> str:
    """One line for the task log and the report."""
    if perf.get("source") == NO_LABELS:
        return "performance: no labels yet"

    def f(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (
        f"performance against {perf['source']} on {perf['labelled_rows']:,} rows ({perf['positives']:,} positive): "
        f"precision {f(perf['precision'])}, recall {f(perf['recall'])}, F1 {f(perf['f1'])}, "
        f"events caught {perf['events_caught']}/{perf['events']}, "
        f"{f(perf['false_alarms_per_1000'])} false alarms per 1,000 rows"
    )
