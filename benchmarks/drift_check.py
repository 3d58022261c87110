"""Drift check speed and false alarms: pipelines.monitoring.drift beside a baseline on the same data.

    .venv/bin/python benchmarks/drift_check.py                 # 1M x 20, 200 no-drift windows of 5,000 rows

The baseline is Evidently's ``DataDriftPreset`` when ``evidently`` imports, else a straightforward
per-column scipy implementation (``ks_2samp`` + ``wasserstein_distance`` / reference std, Evidently's
rule: KS p < 0.05 up to 1,000 reference rows, normed Wasserstein > 0.1 above). Evidently is not in
requirements.lock (0.7.23 does not import with the locked pandas 3.1), so to compare with it, run this
script from a separate venv that has it, with this repository on PYTHONPATH.

Synthetic data: 20 features of five shapes (normal, log-normal, uniform, Poisson counts, a 5% flag);
in the current window 4 features moved by an operationally relevant amount (0.3-0.5 std, or the flag
rate 5% -> 10%) and 4 by a tiny one (0.02 std), which a p-value on 1M rows calls significant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.monitoring.drift import (  # noqa: E402
    DriftThresholds,
    drift_report,
    persistent_alarm,
    reference_profile,
)

SHAPES = ("normal", "lognormal", "uniform", "poisson", "flag")
MOVED = {"f00": 0.5, "f01": 0.3, "f02": 0.4, "f04": "flag"}  # relevant drift
TINY = ("f05", "f06", "f07", "f08")  # 0.02 std: not worth an alarm


def synthetic(rng: np.random.Generator, rows: int, features: int, *, drift: bool) -> pd.DataFrame:
    data = {}
    for i in range(features):
        name, shape = f"f{i:02d}", SHAPES[i % len(SHAPES)]
        if shape == "normal":
            col = rng.normal(10.0, 2.0, rows)
        elif shape == "lognormal":
            col = rng.lognormal(0.0, 0.5, rows)
        elif shape == "uniform":
            col = rng.uniform(0.0, 1.0, rows)
        elif shape == "poisson":
            col = rng.poisson(4.0, rows).astype("float64")
        else:
            rate = 0.10 if drift and MOVED.get(name) == "flag" else 0.05
            col = (rng.random(rows) < rate).astype("float64")
        if drift and isinstance(MOVED.get(name), float):
            col = col + MOVED[name] * col.std()
        if drift and name in TINY:
            col = col + 0.02 * col.std()
        data[name] = col
    return pd.DataFrame(data)


def scipy_baseline(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per column, the straightforward way: KS test and Wasserstein distance on the raw samples."""
    from scipy import stats

    out = {}
    for name in reference.columns:
        ref, cur = reference[name].to_numpy(), current[name].to_numpy()
        ks = stats.ks_2samp(ref, cur)
        std = ref.std()
        wd = stats.wasserstein_distance(ref, cur) / (std if std > 0 else 1.0)
        # Evidently's default: KS p-value for <= 1,000 reference rows, normed Wasserstein above.
        drifted = ks.pvalue < 0.05 if len(ref) <= 1000 else wd > 0.1
        out[name] = {"ks_p": float(ks.pvalue), "wasserstein": float(wd), "drifted": bool(drifted)}
    return out


def evidently_baseline(reference: pd.DataFrame, current: pd.DataFrame) -> list[str] | None:
    """Evidently's DataDriftPreset, or None when evidently does not import here."""
    try:
        from evidently import Report
        from evidently.presets import DataDriftPreset
    except ImportError:
        return None
    snapshot = Report([DataDriftPreset()]).run(current_data=current, reference_data=reference)
    drifted = []
    for metric in snapshot.dict().get("metrics", []):
        config = metric.get("config", {})
        value = metric.get("value")
        column = config.get("column")
        if column and isinstance(value, int | float):
            threshold = config.get("threshold")
            if threshold is not None and value > threshold:
                drifted.append(column)
    return drifted


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the reference and of the current window")
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--windows", type=int, default=200, help="no-drift windows replayed for the false-alarm rate")
    ap.add_argument("--window-rows", type=int, nargs="+", default=[5_000, 1_000], help="one replay per size")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--baseline", choices=["auto", "scipy", "evidently", "none"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    reference = synthetic(rng, args.rows, args.features, drift=False)
    current = synthetic(rng, args.rows, args.features, drift=True)
    print(f"data: reference and current window of {args.rows:,} rows x {args.features} features each")
    print(f"relevant drift in {sorted(MOVED)}; tiny (0.02 std) shift in {list(TINY)}\n")

    profile, t_profile = timed(reference_profile, reference, list(reference.columns))
    report, t_report = timed(drift_report, profile, current)
    print(f"{'':46}{'seconds':>10}  drifted features")
    size = len(profile.to_json())
    print(f"{'ours: reference_profile (once, at training)':<46}{t_profile:>10.2f}  profile JSON {size:,} B")
    print(f"{'ours: drift_report (per window)':<46}{t_report:>10.2f}  {report.drifted_features}")

    baseline = args.baseline
    if baseline in ("auto", "evidently"):
        result, t_base = timed(evidently_baseline, reference, current)
        if result is not None:
            print(f"{'Evidently DataDriftPreset':<46}{t_base:>10.2f}  {sorted(result)}")
        elif baseline == "evidently":
            print("evidently does not import in this environment")
            return 1
        else:
            baseline = "scipy"
    if baseline == "scipy":
        result, t_base = timed(scipy_baseline, reference, current)
        drifted = sorted(n for n, r in result.items() if r["drifted"])
        by_p = sorted(n for n, r in result.items() if r["ks_p"] < 0.05)
        print(f"{'baseline: scipy ks_2samp + wasserstein':<46}{t_base:>10.2f}  {drifted}")
        print(f"{'  (KS p < 0.05 alone would flag)':<46}{'':>10}  {by_p}")
    if baseline != "none":
        print(f"\nspeed-up of drift_report over the baseline: {t_base / t_report:.0f}x")

    # False alarms: windows drawn from the reference distribution, the persistence rule on top.
    thresholds = DriftThresholds()
    print()
    for window_rows in args.window_rows:
        history, alarms, window_drifts, feature_drifts = [], 0, 0, 0
        start = time.perf_counter()
        for _ in range(args.windows):
            window = synthetic(rng, window_rows, args.features, drift=False)
            r = drift_report(profile, window, thresholds=thresholds)
            history.append(r.dataset_drift)
            window_drifts += r.dataset_drift
            feature_drifts += len(r.drifted_features)
            alarms += persistent_alarm(history, k=args.k, n=args.n)
        print(
            f"no-drift replay, {args.windows} windows of {window_rows:,} rows ({time.perf_counter() - start:.1f} s): "
            f"feature checks drifted {feature_drifts / (args.windows * args.features):.2%}, "
            f"windows with dataset drift {window_drifts / args.windows:.2%}, "
            f"false alarms ({args.k} of {args.n} windows) {alarms / args.windows:.2%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
