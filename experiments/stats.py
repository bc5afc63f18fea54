"""The statistics behind SPoT's tables and figures (Vu et al., ACL 2022, §3.1, §3.3, App. E-G).

Table 7 ..... positive_transfers: source -> target transfers above 10% relative error reduction
Table 3 ..... aggregate_targets: average score, absolute and relative change over the 10 targets, per run
Figs. 5, 8 .. pearson, p_value_from_r: similarity vs transfer, Pearson r and its two-sided p (scipy.stats)
The relative error reduction itself, 100 (s - b) / (100 - b), is retrieval.relative_error_reduction.
"""
import math

import numpy as np
from scipy import stats

import data
from retrieval import relative_error_reduction


def positive_transfers(matrix, baseline, threshold=10.0):
    """Table 7: (source, target, rel. error reduction) above `threshold` %, largest first.
    matrix: {source: {target: score}}; baseline: {target: score}."""
    missing = {tgt for row in matrix.values() for tgt in row} - set(baseline)
    if missing:
        raise ValueError(f"no baseline score for target(s) {sorted(missing)}")
    found = [(src, tgt, relative_error_reduction(s, baseline[tgt]))
             for src, row in matrix.items() for tgt, s in row.items()]
    return sorted([t for t in found if t[2] > threshold], key=lambda t: -t[2])


def aggregate_targets(scores, baseline):
    """Table 3 row: {target: per-run scores} vs the baseline's {target: per-run scores or mean} ->
    {"avg_score", "abs_change", "rel_change"}: each (mean, std) over runs (std with ddof 0).
    Run r of the method pairs with run r of the baseline when both have the same number of runs, else the
    baseline mean is used. Pairing is how we read footnote 15: ORACLE's average 80.7 has std 0.0, yet its
    absolute change has std 0.5, so the change must vary with the baseline's run."""
    targets = list(scores)
    if not targets or set(targets) - set(baseline):
        raise ValueError(f"need scores for >= 1 target, each with a baseline; "
                         f"missing {set(targets) - set(baseline)}")
    runs = {t: (np.size(scores[t]), np.size(baseline[t])) for t in targets}
    if len({n for n, _ in runs.values()}) > 1 or len({m for _, m in runs.values()}) > 1:
        raise ValueError(f"every target needs the same number of runs (method, baseline): {runs}")
    s = np.array([np.atleast_1d(scores[t]) for t in targets], dtype=np.float64)  # [targets, runs]
    b = np.array([np.atleast_1d(baseline[t]) for t in targets], dtype=np.float64)
    b = b if b.shape == s.shape else b.mean(1, keepdims=True)
    # Table 3: Abs. = change of the 10-target average; Rel. = mean over targets of the error reduction
    per_run = {"avg_score": s.mean(0), "abs_change": (s - b).mean(0),
               "rel_change": relative_error_reduction(s, b).mean(0)}
    return {name: (float(v.mean()), float(v.std())) for name, v in per_run.items()}


def p_value_from_r(r, n):
    """Two-sided p of Pearson's r over n points: t = r sqrt((n-2) / (1-r^2)) has Student's t distribution
    with n-2 degrees of freedom when x and y are uncorrelated (and normal)."""
    if n < 3:
        raise ValueError(f"a p-value needs n >= 3 points, got {n}")
    if abs(r) >= 1:
        return 0.0
    return float(2 * stats.t.sf(abs(r) * math.sqrt((n - 2) / (1 - r * r)), n - 2))


def pearson(x, y):
    """Pearson r (data.pearson_r, the one STS-B is scored with) and its two-sided p (Fig. 5 / Fig. 8:
    similarity vs relative error reduction of one target)."""
    r = data.pearson_r(x, y)
    return r, p_value_from_r(r, len(x))
