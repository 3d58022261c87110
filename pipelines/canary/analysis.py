"""Pure step analysis: the champion's and the challenger's traffic of one step in, a verdict out.

Every metric ends ``pass``, ``inconclusive`` or ``fail`` and carries the numbers behind it (sample
sizes, both models' values, the test statistic, the p-value and the threshold). The step verdict:
any ``fail`` -> fail; else any blocking ``inconclusive`` -> inconclusive (hold and wait); else pass.

Tests (one-sided where only "worse" matters; each at alpha / k, Bonferroni over the k tests run):

* error rate      - two-proportion z-test, H1: challenger error rate > champion's; fails only if the
                    difference also exceeds ``max_error_rate_increase`` (effect size, as Kayenta does).
* latency p99     - one observation per model call (the records of one request share its latency):
                    Mann-Whitney U, H1: challenger stochastically slower; fails only if its p99 is also
                    > ``max_p99_ratio`` x the champion's and > +min_p99_increase_ms; holds the step until
                    each model made ``min_latency_calls`` calls. Compared on the model's compute time
                    (CPU time of its predict), not the request's wall time: in one process a shadow copy
                    runs beside the next request, so its wall time measures the neighbours too (seen
                    in CI: a good shadowed challenger at 2x the champion's wall p99). Wall-clock p99s of
                    both are reported; a step whose calls were logged without compute times (an older
                    service) is compared on wall time.
* score shift     - paired: Spearman's rho of the two models' scores on the same records; fails when
                    its upper (1 - alpha/k) bound is below ``min_score_rank_correlation``. Unpaired: PSI
                    of the challenger's score distribution against the champion's, each robustly
                    standardised (median, IQR: raw scales of two models differ), in ``psi_bins``
                    champion-quantile bins; fails if PSI > ``psi_fail`` and the two-sample KS test is
                    significant (effect size and significance, like the other metrics).
* flag rate       - share of records flagged anomalous; paired: exact McNemar test on the records the
                    two models flag differently, unpaired: two-proportion z-test (two-sided); fails if
                    significant and the difference exceeds ``max_flag_rate_diff``.
* agreement       - only where both models scored the same records: exact binomial test,
                    H1: agreement < ``min_agreement``.
* F1 on labels    - where feedback exists: bootstrap of F1(challenger) - F1(champion) (paired: both
                    models resampled on the same records); fails when the (1 - alpha/k) upper bound of
                    the difference is below ``-f1_margin``.

Paired first. At a 10% split the two models see different devices, and devices differ more than
two equally good models do: a canary that compares the champion's devices with the challenger's
rolls back good models (seen here: PSI 0.51, KS p = 0.004 between two equally good versions, only
because ~20 of 200 devices went to the challenger; records of one device are not independent
draws, so two-sample tests over records overstate their significance). So every step shadows the
other model on the challenger's records (``shadow: champion``) and score shift, flag rate and F1
compare the two models on those same records; the unpaired comparison is only the fallback of a
step configured without a shadow.

Sample size: a step needs ``min_requests`` scored records from each model and ``bake_seconds`` of
time; F1 needs ``min_labels`` labelled records per model (blocking only with ``require_labels``).

Classifiers (``StepSample.kind == "classifier"``: an image model's rollout, read from /classify's log
by ``pipelines.canary.images``; one record = one photo, one model call) are judged by the same entry
point, state machine and error-rate and latency tests, with three metrics in place of the score ones:

* agreement       - the two models' classes on the same photos (the shadow pairs). Tested as Cohen's
                    kappa, not as raw agreement against ``min_agreement``: two equally good retrains of
                    the fruit classifier (~63% accuracy, 12 classes) agree on only 49-58% of unseen
                    photos (kappa 0.44-0.53), so a fixed floor on raw agreement rolls good models back,
                    while a model that always answers one class agrees exactly as often as chance
                    (kappa 0) whatever the champion's class mix. Fails when the upper (1 - alpha/k)
                    bound of kappa (large-sample standard error) is below ``min_class_kappa``; raw
                    agreement and the chance agreement are reported.
* confidence_shift - the top-1 confidence: paired, Wilcoxon signed-rank test of the per-photo
                    differences (two-sided); unpaired, two-sample KS; fails if significant and the mean
                    confidence moved by more than ``max_confidence_shift``. Overruled, as the score
                    rank check is, where labels on the same photos show the challenger at least as
                    accurate and its classes agree.
* accuracy        - on labelled photos: paired, the mean per-photo difference of correctness (both
                    models on the same photos), else two proportions; fails when the upper (1 - alpha/k)
                    bound of (challenger - champion) is below ``-accuracy_margin``. /classify records no
                    feedback labels yet, so for image rollouts this is unmeasured (non-blocking unless
                    ``require_labels``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.canary.stages import AnalysisConfig, Step

PASS, INCONCLUSIVE, FAIL, SKIPPED = "pass", "inconclusive", "fail", "skipped"
# what a rollout's models predict, which decides the metrics: an anomaly score and flag per record, or
# a class and its top-1 confidence per photo
ANOMALY, CLASSIFIER = "anomaly", "classifier"


@dataclass
class RoleSample:
    """What one model did during the step: one entry per scored record, but for the latencies (one per
    model call). A classifier's record is a photo: ``score`` is its top-1 confidence, ``flagged`` is
    unused, ``labels`` are class codes and ``labelled_classes`` the model's classes of those photos."""

    latency_ms: np.ndarray  # wall time per call, from the request's start (a shadow: from its own start)
    error: np.ndarray  # bool per record
    score: np.ndarray  # scores of the records without error
    flagged: np.ndarray  # bool, score >= the version's decision threshold (records without error)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # ground truth 0/1 (or class)
    labelled_flags: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    compute_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # predict CPU time per call
    labelled_classes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # classifier

    @property
    def n(self) -> int:
        return int(len(self.error))

    @classmethod
    def empty(cls) -> RoleSample:
        z = np.zeros(0)
        return cls(z, z.astype(bool), z, z.astype(bool))


@dataclass
class PairedSample:
    """The records both models scored (a shadow copy), aligned: element i is the same record. For a
    classifier: scores are top-1 confidences, ``*_class`` the class codes, ``labels`` the true class
    code (-1 = no label); the flags are unused."""

    champion_score: np.ndarray
    challenger_score: np.ndarray
    champion_flagged: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    challenger_flagged: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # 0/1, -1 = no label
    champion_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    challenger_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    @property
    def n(self) -> int:
        return int(len(self.champion_score))

    @property
    def agreement(self) -> np.ndarray:
        if len(self.champion_class) == self.n and self.n:
            return np.asarray(self.champion_class) == np.asarray(self.challenger_class)
        return np.asarray(self.champion_flagged, bool) == np.asarray(self.challenger_flagged, bool)

    def labelled(self) -> np.ndarray:
        labels = np.asarray(self.labels)
        return labels >= 0 if len(labels) == self.n else np.zeros(self.n, dtype=bool)


@dataclass
class StepSample:
    champion: RoleSample
    challenger: RoleSample
    paired_agreement: np.ndarray | None = None  # bool per record scored by both models
    elapsed_seconds: float = 0.0
    paired: PairedSample | None = None  # scores and flags of the records both models scored
    kind: str = ANOMALY  # or CLASSIFIER: which metrics judge the step

    def __post_init__(self) -> None:
        if self.paired is not None and self.paired.n and self.paired_agreement is None:
            self.paired_agreement = self.paired.agreement


@dataclass
class MetricResult:
    name: str
    verdict: str
    test: str
    champion: float | None = None
    challenger: float | None = None
    statistic: float | None = None
    p_value: float | None = None
    threshold: str = ""
    n_champion: int = 0
    n_challenger: int = 0
    blocking: bool = True
    detail: str = ""


@dataclass
class StepVerdict:
    verdict: str
    step: str
    reasons: list[str]
    metrics: dict[str, MetricResult]
    alpha_per_test: float
    kind: str = ANOMALY

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"] = {k: _clean(asdict(v)) for k, v in self.metrics.items()}
        return out

    def summary(self) -> str:
        parts = [f"{self.step}: {self.verdict.upper()}"]
        for m in self.metrics.values():
            vals = f"champion={_fmt(m.champion)} challenger={_fmt(m.challenger)}"
            p = f" p={m.p_value:.3g}" if m.p_value is not None else ""
            parts.append(f"  {m.name:<11} {m.verdict:<12} {vals}{p} ({m.threshold}) {m.detail}".rstrip())
        return "\n".join(parts)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# --------------------------------------------------------------------------- statistics


def two_proportion_z(k1: int, n1: int, k2: int, n2: int, alternative: str = "greater") -> tuple[float, float]:
    """z and p-value for H1: p2 > p1 ("greater"), or p2 != p1 ("two-sided"). Pooled variance."""
    from scipy.stats import norm

    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (p2 - p1) / se
    if alternative == "greater":
        return z, float(norm.sf(z))
    return z, float(2 * norm.sf(abs(z)))


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``actual`` against ``expected`` in quantile bins of ``expected``."""
    expected = np.asarray(expected, dtype=float)
    actual = np.asarray(actual, dtype=float)
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1)
    # Laplace smoothing (+0.5 per bin): an empty bin in a small sample must not dominate the index
    e = (e + 0.5) / (e.sum() + 0.5 * len(e))
    a = (a + 0.5) / (a.sum() + 0.5 * len(a))
    return float(np.sum((a - e) * np.log(a / e)))


def _robust_standardise(x: np.ndarray) -> np.ndarray:
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    return (x - q50) / (q75 - q25 if q75 > q25 else 1.0)


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    y = np.asarray(y, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    tp = np.sum(y & pred)
    denom = 2 * tp + np.sum(~y & pred) + np.sum(y & ~pred)
    return float(2 * tp / denom) if denom else 0.0


def _f1_rows(yb: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """F1 of each row of a (draws, n) matrix of labels and predictions."""
    tp = (yb & pb).sum(axis=1)
    denom = 2 * tp + (~yb & pb).sum(axis=1) + (yb & ~pb).sum(axis=1)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def _bootstrap_f1(y: np.ndarray, pred: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, len(y), size=(draws, len(y)))
    return _f1_rows(y[idx].astype(bool), pred[idx].astype(bool))


# --------------------------------------------------------------------------- the metrics


def _error_rate(s: StepSample, cfg: AnalysisConfig, alpha: float, min_n: int) -> MetricResult:
    ch, cl = s.champion, s.challenger
    k1, k2 = int(ch.error.sum()), int(cl.error.sum())
    r1 = k1 / ch.n if ch.n else None
    r2 = k2 / cl.n if cl.n else None
    res = MetricResult(
        "error_rate",
        INCONCLUSIVE,
        "two-proportion z-test, one-sided (challenger > champion)",
        r1,
        r2,
        threshold=f"fail if p < {alpha:.4g} and increase > {cfg.max_error_rate_increase}",
        n_champion=ch.n,
        n_challenger=cl.n,
    )
    if min(ch.n, cl.n) < min_n:
        res.detail = f"needs {min_n} records from each model"
        return res
    res.statistic, res.p_value = two_proportion_z(k1, ch.n, k2, cl.n, "greater")
    worse = res.p_value < alpha and (r2 - r1) > cfg.max_error_rate_increase
    res.verdict = FAIL if worse else PASS
    return res


def _call_times(r: RoleSample) -> np.ndarray | None:
    """The model's compute time of each call that has one (failed calls and calls logged by a service
    older than the compute-time column have none), or None when no call has one."""
    c = np.asarray(r.compute_ms, dtype=float)
    c = c[np.isfinite(c)]
    return c if len(c) else None


def _p99(x: np.ndarray) -> float | None:
    return float(np.percentile(x, 99)) if len(x) else None


def _latency(s: StepSample, cfg: AnalysisConfig, alpha: float) -> MetricResult:
    from scipy.stats import mannwhitneyu

    wall_a, wall_b = np.asarray(s.champion.latency_ms, float), np.asarray(s.challenger.latency_ms, float)
    ca, cb = _call_times(s.champion), _call_times(s.challenger)
    compute = ca is not None and cb is not None
    a, b = (ca, cb) if compute else (wall_a, wall_b)
    res = MetricResult(
        "latency_p99",
        INCONCLUSIVE,
        "Mann-Whitney U over model calls, one-sided (challenger slower), on "
        + ("compute time (predict CPU ms)" if compute else "wall time (ms)"),
        _p99(a),
        _p99(b),
        threshold=(
            f"fail if p < {alpha:.4g} and p99 > {cfg.max_p99_ratio}x champion and > +{cfg.min_p99_increase_ms} ms"
        ),
        n_champion=len(a),
        n_challenger=len(b),
    )
    if compute and len(wall_a) and len(wall_b):
        res.detail = f"wall-clock p99 for the record: champion {_p99(wall_a):.4g} ms, challenger {_p99(wall_b):.4g} ms"
    if min(len(a), len(b)) < cfg.min_latency_calls:
        res.detail = f"needs {cfg.min_latency_calls} calls of each model (has {len(a)} and {len(b)})"
        return res
    stat = mannwhitneyu(b, a, alternative="greater")
    res.statistic, res.p_value = float(stat.statistic), float(stat.pvalue)
    p99a, p99b = float(res.champion), float(res.challenger)  # type: ignore[arg-type]
    slower = p99b > cfg.max_p99_ratio * p99a and p99b - p99a > cfg.min_p99_increase_ms
    res.verdict = FAIL if (res.p_value < alpha and slower) else PASS
    return res


def _score_shift(s: StepSample, cfg: AnalysisConfig, alpha: float, min_n: int) -> MetricResult:
    pair = _paired(s, min_n)
    if pair is not None:
        return _score_rank_correlation(pair, cfg, alpha)
    from scipy.stats import ks_2samp

    a, b = s.champion.score, s.challenger.score
    res = MetricResult(
        "score_shift",
        INCONCLUSIVE,
        f"PSI over {cfg.psi_bins} champion-quantile bins (KS reported), unpaired",
        threshold=f"fail if PSI > {cfg.psi_fail} and KS p < {alpha:.4g}",
        n_champion=len(a),
        n_challenger=len(b),
    )
    if min(len(a), len(b)) < min_n:
        res.detail = f"needs {min_n} scores from each model"
        return res
    # Two models' raw scores live on different scales (equally good IsolationForests of different
    # seeds gave PSI 0.5 on raw scores with identical decisions), so the shapes are compared after
    # robust standardisation of each model's own scores (median, IQR); decisions are compared by
    # flag_rate, agreement and F1.
    a_std, b_std = _robust_standardise(a), _robust_standardise(b)
    value = psi(a_std, b_std, cfg.psi_bins)
    ks = ks_2samp(a_std, b_std)
    res.statistic, res.p_value = value, float(ks.pvalue)
    res.champion, res.challenger = float(np.median(a)), float(np.median(b))
    res.detail = f"PSI={value:.4f}; KS D={ks.statistic:.4f} p={ks.pvalue:.3g}; values are median scores"
    res.verdict = FAIL if (value > cfg.psi_fail and ks.pvalue < alpha) else PASS
    return res


def _score_rank_correlation(pair: PairedSample, cfg: AnalysisConfig, alpha: float) -> MetricResult:
    """Paired score shift: do the two models order the same records alike (Spearman's rho)?

    Two models' score distributions differ in shape even when they decide alike (two equally good
    IsolationForests of different seeds: KS D = 0.10 after standardisation, PSI 0.5 on the ~20
    devices of a 10% split, identical flags), so with more traffic a distribution test rolls back good
    models. On paired records the question that matters is whether the challenger ranks records as
    the champion does; PSI and KS stay in the detail for the record.
    """
    from scipy.stats import ks_2samp, norm, spearmanr

    a, b = np.asarray(pair.champion_score, float), np.asarray(pair.challenger_score, float)
    n = len(a)
    rho = float(spearmanr(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else 0.0
    rho = rho if math.isfinite(rho) else 0.0
    # Fisher z with the Fieller-Hartley-Pearson standard error for Spearman's rho, one-sided
    z = math.atanh(min(max(rho, -0.999999), 0.999999))
    se = 1.03 / math.sqrt(max(n - 3, 1))
    upper = math.tanh(z + float(norm.isf(alpha)) * se)
    z0 = math.atanh(cfg.min_score_rank_correlation)
    a_std, b_std = _robust_standardise(a), _robust_standardise(b)
    ks = ks_2samp(a_std, b_std)
    return MetricResult(
        "score_shift",
        FAIL if upper < cfg.min_score_rank_correlation else PASS,
        "Spearman rank correlation of both models' scores on the records both scored (Fisher z, one-sided)",
        champion=float(np.median(a)),
        challenger=float(np.median(b)),
        statistic=rho,
        p_value=float(norm.cdf((z - z0) / se)),  # H0: rho >= the minimum
        threshold=f"fail if upper {1 - alpha:.4g} bound of rho < {cfg.min_score_rank_correlation}",
        n_champion=n,
        n_challenger=n,
        detail=(
            f"rho={rho:.4f}, upper bound {upper:.4f}; {n} paired records; for the record: "
            f"PSI={psi(a_std, b_std, cfg.psi_bins):.4f}, KS D={ks.statistic:.4f}; values are median scores"
        ),
    )


def _flag_rate(s: StepSample, cfg: AnalysisConfig, alpha: float, min_n: int) -> MetricResult:
    from scipy.stats import binomtest

    pair = _paired(s, min_n)
    if pair is not None:
        a, b = np.asarray(pair.champion_flagged, bool), np.asarray(pair.challenger_flagged, bool)
    else:
        a, b = s.champion.flagged, s.challenger.flagged
    res = MetricResult(
        "flag_rate",
        INCONCLUSIVE,
        "two-proportion z-test, two-sided" if pair is None else "exact McNemar test on the records both models scored",
        float(a.mean()) if len(a) else None,
        float(b.mean()) if len(b) else None,
        threshold=f"fail if p < {alpha:.4g} and |difference| > {cfg.max_flag_rate_diff}",
        n_champion=len(a),
        n_challenger=len(b),
    )
    if min(len(a), len(b)) < min_n:
        res.detail = f"needs {min_n} scores from each model"
        return res
    if pair is not None:
        only_challenger, only_champion = int(np.sum(b & ~a)), int(np.sum(a & ~b))
        discordant = only_challenger + only_champion
        res.statistic = float(only_challenger - only_champion)
        res.p_value = float(binomtest(only_challenger, discordant, 0.5).pvalue) if discordant else 1.0
        res.detail = f"flagged by the challenger only: {only_challenger}, by the champion only: {only_champion}"
    else:
        res.statistic, res.p_value = two_proportion_z(int(a.sum()), len(a), int(b.sum()), len(b), "two-sided")
    differs = abs(res.challenger - res.champion) > cfg.max_flag_rate_diff
    res.verdict = FAIL if (res.p_value < alpha and differs) else PASS
    return res


def _agreement(s: StepSample, cfg: AnalysisConfig, alpha: float, min_n: int) -> MetricResult:
    from scipy.stats import binomtest

    agree = s.paired_agreement
    res = MetricResult(
        "agreement",
        SKIPPED,
        f"exact binomial test, H1: agreement < {cfg.min_agreement}",
        threshold=f"fail if p < {alpha:.4g}",
        blocking=False,
    )
    if agree is None or len(agree) == 0:
        res.detail = "no records scored by both models in this step"
        return res
    res.blocking = True
    n, k = len(agree), int(np.sum(agree))
    res.n_champion = res.n_challenger = n
    res.challenger = k / n
    res.champion = 1.0
    if n < min_n:
        res.verdict = INCONCLUSIVE
        res.detail = f"needs {min_n} paired records"
        return res
    res.p_value = float(binomtest(k, n, cfg.min_agreement, alternative="less").pvalue)
    res.statistic = k / n
    res.verdict = FAIL if res.p_value < alpha else PASS
    return res


def _labelled_pair(s: StepSample, cfg: AnalysisConfig):
    """The records both models scored, when enough of them have labels to compare the models on the
    same records; None: each model is judged on its own labelled records."""
    return s.paired if s.paired is not None and int(s.paired.labelled().sum()) >= cfg.min_labels else None


def _f1(s: StepSample, cfg: AnalysisConfig, alpha: float) -> MetricResult:
    ch, cl = s.champion, s.challenger
    pair = _labelled_pair(s, cfg)
    res = MetricResult(
        "f1",
        INCONCLUSIVE,
        f"bootstrap ({cfg.bootstrap} draws) of F1 difference, one-sided"
        + (", both models resampled on the same labelled records" if pair is not None else ""),
        threshold=f"fail if upper {1 - alpha:.4g} bound of (challenger - champion) < -{cfg.f1_margin}",
        n_champion=len(ch.labels),
        n_challenger=len(cl.labels),
        blocking=cfg.require_labels,
    )
    rng = np.random.default_rng(cfg.seed)
    if pair is not None:
        labelled = pair.labelled()
        y = np.asarray(pair.labels)[labelled].astype(bool)
        fa = np.asarray(pair.champion_flagged, bool)[labelled]
        fb = np.asarray(pair.challenger_flagged, bool)[labelled]
        res.n_champion = res.n_challenger = len(y)
        res.champion, res.challenger = f1(y, fa), f1(y, fb)
        idx = rng.integers(0, len(y), size=(cfg.bootstrap, len(y)))
        diff = _f1_rows(y[idx], fb[idx]) - _f1_rows(y[idx], fa[idx])
    else:
        if min(len(ch.labels), len(cl.labels)) < cfg.min_labels:
            res.detail = f"needs {cfg.min_labels} labelled records per model (feedback)"
            return res
        res.champion, res.challenger = f1(ch.labels, ch.labelled_flags), f1(cl.labels, cl.labelled_flags)
        diff = _bootstrap_f1(cl.labels, cl.labelled_flags, cfg.bootstrap, rng) - _bootstrap_f1(
            ch.labels, ch.labelled_flags, cfg.bootstrap, rng
        )
    upper = float(np.quantile(diff, 1 - alpha))
    res.statistic = res.challenger - res.champion
    res.p_value = float(np.mean(diff >= -cfg.f1_margin))  # bootstrap p for H0: diff >= -margin
    res.detail = f"difference {res.statistic:+.4f}, upper bound {upper:+.4f}"
    res.blocking = True
    res.verdict = FAIL if upper < -cfg.f1_margin else PASS
    return res


def _paired(s: StepSample, min_n: int) -> PairedSample | None:
    """The paired records, when there are enough of them to decide on."""
    return s.paired if s.paired is not None and s.paired.n >= min_n else None


def _labels_decide_over_ranks(sample: StepSample, cfg: AnalysisConfig, min_n: int, by_name: dict) -> None:
    """The paired score-rank check is a proxy for "the challenger is not broken" while no labels say
    how its decisions compare. Where they do, on the same labelled records, the evidence wins: a
    challenger whose F1 there is at least the champion's, and whose flags agree with the champion's,
    is not failed because the two order the records they both call normal differently (seen in the
    drift loop: a retrained gradient-boosting model, rho 0.30 over near-zero probabilities, agreement
    0.997, F1 0.92 vs 0.86, was rolled back by the rank check alone). The rank result stays in the
    verdict, marked as overruled."""
    shift, f1m, agreement = by_name["score_shift"], by_name["f1"], by_name["agreement"]
    paired_labels = sample.paired is not None and int(sample.paired.labelled().sum()) >= cfg.min_labels
    if not (
        shift.verdict == FAIL
        and _paired(sample, min_n) is not None
        and paired_labels
        and f1m.verdict == PASS
        and (f1m.statistic or 0.0) >= 0.0
        and agreement.verdict == PASS
    ):
        return
    shift.verdict = PASS
    shift.detail = (
        f"rank check overruled by labels: on {f1m.n_champion} labelled records both scored, challenger F1 "
        f"{_fmt(f1m.challenger)} >= champion's {_fmt(f1m.champion)} and flags agree ({_fmt(agreement.challenger)}); "
        + shift.detail
    )


# --------------------------------------------------------------------------- classifiers


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(observed agreement, agreement expected by chance from each model's class shares, kappa) of two
    models' classes on the same photos. Two models that answer one and the same class throughout agree
    fully: kappa 1 (undefined by the formula: no disagreement is possible by chance either)."""
    a, b = np.asarray(a), np.asarray(b)
    if not len(a):
        return 0.0, 0.0, 0.0
    observed = float(np.mean(a == b))
    classes, codes = np.unique(np.concatenate([a, b]), return_inverse=True)
    share_a = np.bincount(codes[: len(a)], minlength=len(classes)) / len(a)
    share_b = np.bincount(codes[len(a) :], minlength=len(classes)) / len(b)
    chance = float(np.sum(share_a * share_b))
    if chance >= 1.0:
        return observed, chance, 1.0
    return observed, chance, (observed - chance) / (1.0 - chance)


def _class_agreement(s: StepSample, cfg: AnalysisConfig, alpha: float, min_n: int) -> MetricResult:
    from scipy.stats import norm

    pair = s.paired
    res = MetricResult(
        "agreement",
        SKIPPED,
        "Cohen's kappa of both models' classes on the photos both classified (normal bound, one-sided)",
        threshold=f"fail if upper {1 - alpha:.4g} bound of kappa < {cfg.min_class_kappa}",
        blocking=False,
    )
    if pair is None or pair.n == 0:
        res.detail = "no photos classified by both models in this step"
        return res
    res.blocking = True
    n = pair.n
    res.n_champion = res.n_challenger = n
    observed, chance, kappa = cohen_kappa(pair.champion_class, pair.challenger_class)
    res.champion, res.challenger = 1.0, observed  # as the anomaly agreement: the champion agrees with itself
    res.statistic = kappa
    if n < min_n:
        res.verdict = INCONCLUSIVE
        res.detail = f"needs {min_n} paired photos (has {n})"
        return res
    # large-sample standard error of kappa (Cohen 1960); 0/1 agreement gives it a floor of 1/n
    se = max(math.sqrt(observed * (1 - observed) / n), 1.0 / n) / max(1.0 - chance, 1e-9)
    upper = kappa + float(norm.isf(alpha)) * se
    res.p_value = float(norm.cdf((kappa - cfg.min_class_kappa) / se))  # H0: kappa >= the minimum
    res.verdict = FAIL if upper < cfg.min_class_kappa else PASS
    res.detail = (
        f"kappa={kappa:.4f}, upper bound {upper:.4f}; classes agree on {observed:.1%} of {n} photos, "
        f"{chance:.1%} expected by chance from each model's class shares"
    )
    return res


def _confidence_shift(s: StepSample, cfg: AnalysisConfig, alpha: float, min_n: int) -> MetricResult:
    from scipy.stats import ks_2samp, wilcoxon

    pair = _paired(s, min_n)
    if pair is not None:
        a, b = np.asarray(pair.champion_score, float), np.asarray(pair.challenger_score, float)
    else:
        a, b = np.asarray(s.champion.score, float), np.asarray(s.challenger.score, float)
    res = MetricResult(
        "confidence_shift",
        INCONCLUSIVE,
        "Wilcoxon signed-rank test of top-1 confidence on the photos both classified, two-sided"
        if pair is not None
        else "two-sample KS test of top-1 confidence, unpaired",
        float(a.mean()) if len(a) else None,
        float(b.mean()) if len(b) else None,
        threshold=f"fail if p < {alpha:.4g} and |mean shift| > {cfg.max_confidence_shift}",
        n_champion=len(a),
        n_challenger=len(b),
    )
    if min(len(a), len(b)) < min_n:
        res.detail = f"needs {min_n} classified photos from each model"
        return res
    shift = float(b.mean() - a.mean())
    if pair is not None:
        diff = b - a
        if np.all(diff == 0):
            res.statistic, res.p_value = 0.0, 1.0
        else:
            test = wilcoxon(b, a, alternative="two-sided")
            res.statistic, res.p_value = float(test.statistic), float(test.pvalue)
        res.detail = f"mean shift {shift:+.4f}, median per-photo difference {np.median(diff):+.4f}; values are means"
    else:
        ks = ks_2samp(a, b)
        res.statistic, res.p_value = float(ks.statistic), float(ks.pvalue)
        res.detail = f"mean shift {shift:+.4f}; KS D={ks.statistic:.4f}; values are means"
    res.verdict = FAIL if (res.p_value < alpha and abs(shift) > cfg.max_confidence_shift) else PASS
    return res


def _accuracy(s: StepSample, cfg: AnalysisConfig, alpha: float) -> MetricResult:
    from scipy.stats import norm

    ch, cl = s.champion, s.challenger
    pair = _labelled_pair(s, cfg)
    res = MetricResult(
        "accuracy",
        INCONCLUSIVE,
        "difference of accuracy (challenger - champion), normal bound, one-sided"
        + (", both models on the same labelled photos" if pair is not None else ""),
        threshold=f"fail if upper {1 - alpha:.4g} bound of (challenger - champion) < -{cfg.accuracy_margin}",
        n_champion=len(ch.labels),
        n_challenger=len(cl.labels),
        blocking=cfg.require_labels,
    )
    if pair is not None:
        labelled = pair.labelled()
        y = np.asarray(pair.labels)[labelled]
        right_a = np.asarray(pair.champion_class)[labelled] == y
        right_b = np.asarray(pair.challenger_class)[labelled] == y
        n = len(y)
        res.n_champion = res.n_challenger = n
        res.champion, res.challenger = float(right_a.mean()), float(right_b.mean())
        d = right_b.astype(float) - right_a.astype(float)
        se = max(float(np.std(d, ddof=1)) if n > 1 else 0.0, 1.0 / n) / math.sqrt(n)
    else:
        if min(len(ch.labels), len(cl.labels)) < cfg.min_labels:
            res.detail = (
                f"needs {cfg.min_labels} labelled photos per model (has {len(ch.labels)} and {len(cl.labels)}); "
                "unmeasured without feedback labels"
            )
            return res
        pa = float(np.mean(np.asarray(ch.labelled_classes) == np.asarray(ch.labels)))
        pb = float(np.mean(np.asarray(cl.labelled_classes) == np.asarray(cl.labels)))
        res.champion, res.challenger = pa, pb
        se = math.sqrt(pa * (1 - pa) / len(ch.labels) + pb * (1 - pb) / len(cl.labels)) or 1.0 / len(cl.labels)
    diff = float(res.challenger - res.champion)
    upper = diff + float(norm.isf(alpha)) * se
    res.statistic = diff
    res.p_value = float(norm.cdf((diff + cfg.accuracy_margin) / se))  # H0: diff >= -margin
    res.detail = f"difference {diff:+.4f}, upper bound {upper:+.4f}"
    res.blocking = True
    res.verdict = FAIL if upper < -cfg.accuracy_margin else PASS
    return res


def _labels_decide_over_confidence(sample: StepSample, cfg: AnalysisConfig, by_name: dict) -> None:
    """A confidence shift is a proxy for "the challenger is broken" while no labels say how its classes
    compare; where labels on the same photos show it at least as accurate, with classes that agree, a
    more (or less) confident challenger is not rolled back for its confidence alone."""
    shift, acc, agreement = by_name["confidence_shift"], by_name["accuracy"], by_name["agreement"]
    paired_labels = sample.paired is not None and int(sample.paired.labelled().sum()) >= cfg.min_labels
    if shift.verdict == FAIL and paired_labels and acc.verdict == PASS and (acc.statistic or 0.0) >= 0.0:
        if agreement.verdict == PASS:
            shift.verdict = PASS
            shift.detail = (
                f"overruled by labels: on {acc.n_champion} labelled photos both classified, challenger accuracy "
                f"{_fmt(acc.challenger)} >= champion's {_fmt(acc.champion)} and classes agree; " + shift.detail
            )


def _classifier_metrics(sample: StepSample, cfg: AnalysisConfig, alpha: float, min_n: int) -> list[MetricResult]:
    metrics = [
        _error_rate(sample, cfg, alpha, min_n),
        _latency(sample, cfg, alpha),
        _confidence_shift(sample, cfg, alpha, min_n),
        _class_agreement(sample, cfg, alpha, min_n),
        _accuracy(sample, cfg, alpha),
    ]
    _labels_decide_over_confidence(sample, cfg, {m.name: m for m in metrics})
    return metrics


def analyze_step(sample: StepSample, step: Step, cfg: AnalysisConfig) -> StepVerdict:
    """The step's verdict from what both models did (pure: no I/O, deterministic for a given seed).
    ``sample.kind`` chooses the metrics: anomaly scores and flags, or a classifier's classes."""
    min_n = step.min_requests
    if sample.kind == CLASSIFIER:
        paired = sample.paired is not None and sample.paired.n > 0
        k = 4 + int(paired)  # error, latency, confidence shift, accuracy, agreement
        alpha = cfg.alpha / k
        metrics = _classifier_metrics(sample, cfg, alpha, min_n)
    elif sample.kind == ANOMALY:
        paired = sample.paired_agreement is not None and len(sample.paired_agreement) > 0
        k = 5 + int(paired)  # error, latency, psi (no p-value but counted conservatively), flags, f1, agreement
        alpha = cfg.alpha / k
        metrics = [
            _error_rate(sample, cfg, alpha, min_n),
            _latency(sample, cfg, alpha),
            _score_shift(sample, cfg, alpha, min_n),
            _flag_rate(sample, cfg, alpha, min_n),
            _agreement(sample, cfg, alpha, min_n),
            _f1(sample, cfg, alpha),
        ]
        _labels_decide_over_ranks(sample, cfg, min_n, {m.name: m for m in metrics})
    else:
        raise ValueError(f"step sample of kind {sample.kind!r}: the analysis knows {ANOMALY!r} and {CLASSIFIER!r}")
    by_name = {m.name: m for m in metrics}
    failed = [m for m in metrics if m.verdict == FAIL]
    reasons: list[str] = []
    if failed:
        reasons = [
            f"{m.name} failed ({m.threshold}; champion={_fmt(m.champion)} "
            f"challenger={_fmt(m.challenger)} p={_fmt(m.p_value)}) {m.detail}".strip()
            for m in failed
        ]
        return StepVerdict(FAIL, step.name, reasons, by_name, alpha, sample.kind)
    holding = [m for m in metrics if m.verdict == INCONCLUSIVE and m.blocking]
    if sample.elapsed_seconds < step.bake_seconds:
        reasons.append(f"baking: {sample.elapsed_seconds:.0f}s of {step.bake_seconds:.0f}s")
    reasons += [f"{m.name}: {m.detail}" for m in holding]
    if reasons:
        return StepVerdict(INCONCLUSIVE, step.name, reasons, by_name, alpha, sample.kind)
    return StepVerdict(PASS, step.name, ["every metric passed"], by_name, alpha, sample.kind)
