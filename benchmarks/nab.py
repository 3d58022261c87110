"""NAB benchmark of the platform's streaming anomaly detectors.

    .venv/bin/python benchmarks/nab.py                                  # default detector, ../shared corpus
    .venv/bin/python benchmarks/nab.py --corpus DIR --detector contextual --jobs 2
    .venv/bin/python benchmarks/nab.py --profile standard

Runs a detector through the model family training registers (``pipelines.training.StreamingScorer``
over ``pipelines.detectors``: the object the registry stores and the gate and scoring load) online
over every file of a folder in NAB's layout (``data/<category>/*.csv``, ``labels/combined_windows.json``,
optionally ``results/<detector>/``), one fresh state per file from its first row, as NAB requires.
Scores it with ``pipelines.evaluation.nab`` (one threshold per profile optimised over all files),
beside every reference detector found in ``DIR/results`` scored the same way on the same files, and
prints the normalised score per category and in total, false alarms per day and windows detected at
the optimised threshold, and the time taken.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.detectors import DEFAULT_DETECTOR, DETECTORS  # noqa: E402
from pipelines.evaluation import nab  # noqa: E402

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / ".." / "shared" / "datasets" / "nab" / "corpus"
SHORT = {"standard": "std", "reward_low_FP_rate": "lowFP", "reward_low_FN_rate": "lowFN"}


def _run_file(args: tuple[str, str, np.ndarray, np.ndarray]) -> tuple[str, np.ndarray, float]:
    import pandas as pd

    from pipelines.training import StreamingScorer

    detector, name, timestamps, values = args
    t0 = time.perf_counter()
    # a model with no training rows: each file's stream starts from a fresh state at its first row
    model = StreamingScorer(detector, readings=["value"])
    frame = pd.DataFrame({"device": name, "ts": pd.to_datetime(timestamps, utc=True), "value": values})
    scores = model.predict(frame)
    return name, np.asarray(scores, dtype=np.float64), time.perf_counter() - t0


def run_detector(files: list[nab.CorpusFile], detector: str, jobs: int) -> dict[str, np.ndarray]:
    tasks = [(detector, f.name, f.timestamps, f.values) for f in files]
    out: dict[str, np.ndarray] = {}
    done = 0

    def report(name: str, scores: np.ndarray, seconds: float) -> None:
        nonlocal done
        done += 1
        out[name] = scores
        print(f"  [{done:>2}/{len(files)}] {name} {len(scores)} rows {seconds:.1f}s", flush=True)

    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(jobs) as pool:
            # longest files first so the pool ends together
            tasks.sort(key=lambda t: -len(t[3]))
            for name, scores, seconds in pool.imap_unordered(_run_file, tasks):
                report(name, scores, seconds)
    else:
        for task in tasks:
            report(*_run_file(task))
    return out


def _score(files, scores: dict[str, np.ndarray], profile: nab.CostMatrix, categories: list[str]):
    """Corpus score (threshold optimised over all files) and per-category normalised at that threshold."""
    pairs = [(f, scores[f.name]) for f in files]
    total = nab.normalised_scores(pairs, profile)
    per_cat: dict[str, float | None] = {}
    for cat in categories:
        sub = [(f, s) for f, s in pairs if f.category == cat]
        try:
            per_cat[cat] = nab.normalised_scores(sub, profile, threshold=total.threshold).normalised
        except ValueError:  # no window in this category: report the raw (FP) score instead
            per_cat[cat] = None
    return total, per_cat


def _abbrev(category: str) -> str:
    return category.replace("artificial", "art").replace("real", "").replace("Anomaly", "Anom")


def _events(files, scores: dict[str, np.ndarray], threshold: float) -> tuple[int, int, float]:
    detected = total = events = 0
    days = 0.0
    for f in files:
        m = nab.event_metrics(f.timestamps, f.windows, scores[f.name] >= threshold, nab.PROBATION_PERCENT)
        detected += m.windows_detected
        total += m.windows_total
        events += m.false_alarm_events
        days += m.scored_days
    return detected, total, events / days if days else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder in NAB's layout")
    ap.add_argument("--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS))
    ap.add_argument(
        "--profile", action="append", choices=sorted(nab.PROFILES), help="profile(s) to report (default: all three)"
    )
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one file per task)")
    ap.add_argument("--no-reference", action="store_true", help="skip the detectors under DIR/results")
    args = ap.parse_args(argv)

    corpus = args.corpus.resolve()
    profiles = args.profile or list(nab.PROFILES)
    files = nab.load_corpus(corpus)
    categories = sorted({f.category for f in files})
    rows = sum(len(f.values) for f in files)
    print(
        f"NAB corpus {corpus}: {len(files)} files, {rows} rows, "
        f"{sum(len(f.windows) for f in files)} windows; detector {args.detector!r}, jobs {args.jobs}"
    )

    t0 = time.perf_counter()
    ours = run_detector(files, args.detector, args.jobs)
    elapsed = time.perf_counter() - t0
    print(f"detector time {elapsed:.1f}s ({1e6 * elapsed / max(rows, 1):.0f} us/row)")

    candidates: dict[str, dict[str, np.ndarray]] = {args.detector: ours}
    if not args.no_reference:
        for ref in nab.detectors_in(corpus):
            try:
                loaded = nab.load_detector_scores(corpus, ref)
            except FileNotFoundError:
                continue
            if all(f.name in loaded and len(loaded[f.name]) == len(f.values) for f in files):
                candidates[ref] = loaded
            else:
                print(f"(skipping reference {ref}: results do not cover every file)")

    short = {c: _abbrev(c) for c in categories}
    cat_w = max(7, *(len(v) for v in short.values()))
    for prof in profiles:
        cm = nab.PROFILES[prof]
        print(f"\nprofile {prof}")
        cats_head = " ".join(f"{short[c]:>{cat_w}}" for c in categories)
        head = f"{'detector':<18}{'total':>7}{'thresh':>8}{'windows':>9}{'FA/day':>8}  {cats_head}"
        print(head)
        for name, scores in candidates.items():
            total, per_cat = _score(files, scores, cm, categories)
            det, tot, fapd = _events(files, scores, total.threshold)
            cats = " ".join(f"{(f'{v:.1f}' if v is not None else '-'):>{cat_w}}" for v in per_cat.values())
            print(f"{name:<18}{total.normalised:>7.1f}{total.threshold:>8.3f}{f'{det}/{tot}':>9}{fapd:>8.2f}  {cats}")
    print(
        "\nper-category scores at the corpus threshold ('-': no window); windows = detected/scored; "
        "FA/day = false-alarm events per scored day"
    )
    print(f"total time {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
