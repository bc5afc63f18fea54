"""experiments/stats.py: the paper's Tables 3 and 7 and Fig. 8's p-values recomputed from its own numbers."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

import retrieval
from experiments import paper_numbers as P
from experiments import stats as S

ROOT = Path(__file__).resolve().parents[1]


def _table6():
    """Table 6's means as {source: {target: score}} and the baseline's {target: score}."""
    baseline = {t: P.table6("BASELINE", t)[0] for t in P.TARGETS}
    matrix = {s: {t: P.table6(s, t)[0] for t in P.TARGETS} for s in P.SOURCES}
    return matrix, baseline


def test_table7_recomputed_from_table6():
    matrix, baseline = _table6()
    found = S.positive_transfers(matrix, baseline, threshold=10)
    assert len(found) == 30
    got = {(s, t): v for s, t, v in found}
    assert set(got) == {(s, t) for s, t, _ in P.TABLE7}  # and no other pair above 10%
    for s, t, v in P.TABLE7:
        assert abs(got[s, t] - v) < 0.05, (s, t, got[s, t], v)
    assert [v for *_, v in found] == sorted((v for *_, v in found), reverse=True)


def test_baseline_and_best_source_averages_from_table6():
    matrix, baseline = _table6()
    agg = S.aggregate_targets({t: [b] for t, b in baseline.items()}, baseline)
    assert round(agg["avg_score"][0], 1) == P.CLAIMS["baseline_average"] == 74.7
    assert agg["abs_change"] == (0.0, 0.0) and agg["rel_change"] == (0.0, 0.0)
    # the best *mean* source per target averages 79.4, below the ORACLE's 80.7 over single prompts (§3.1)
    best = {t: max(matrix[s][t] for s in P.SOURCES) for t in P.TARGETS}
    avg, abs_change, _ = (v[0] for v in S.aggregate_targets(best, baseline).values())
    assert round(avg, 1) == 79.4 and round(abs_change, 1) == 4.7 and avg < P.CLAIMS["oracle_average"]


def test_aggregate_targets_known_answer():
    agg = S.aggregate_targets({"A": [80, 90], "B": [60, 70]}, {"A": [70, 80], "B": [50, 50]})
    # per run: avg (70, 80); abs change (10, 15); rel change ((33.3+20)/2, (50+40)/2) = (26.67, 45)
    np.testing.assert_allclose(agg["avg_score"], (75.0, 5.0))
    np.testing.assert_allclose(agg["abs_change"], (12.5, 2.5))
    np.testing.assert_allclose(agg["rel_change"], ((80 / 3 + 45) / 2, (45 - 80 / 3) / 2))
    # an unpaired baseline (one number per target) is used as is
    np.testing.assert_allclose(S.aggregate_targets({"A": [80, 90]}, {"A": 70})["abs_change"], (15.0, 5.0))


def test_fig8_p_values_follow_from_r_over_48_source_prompts():
    """Fig. 8 prints r and p per target; p is the t-test of r over the 48 source prompts (§3.3)."""
    for target, (r, p) in P.FIG8.items():
        # r is printed to 2-3 decimals, p to 3 decimals (STS-B to 4 significant digits)
        lo, hi = sorted(S.p_value_from_r(r + d, 48) for d in (-0.005, 0.005))
        assert lo - 0.0005 <= p <= hi + 0.0005, (target, r, p, lo, hi)
    assert S.p_value_from_r(0.708, 48) == pytest.approx(1.853e-8, rel=0.03)


def test_p_value_known_answers_and_pearson():
    # n = 4: t with 2 degrees of freedom gives p = 1 - |r|; n = 3 (1 d.o.f., Cauchy): p = 1 - 2 asin|r| / pi
    for r in (-0.9, -0.3, 0.0, 0.5, 0.99):
        assert S.p_value_from_r(r, 4) == pytest.approx(1 - abs(r), abs=1e-12)
        assert S.p_value_from_r(r, 3) == pytest.approx(1 - 2 * np.arcsin(abs(r)) / np.pi, abs=1e-12)
    assert S.p_value_from_r(1.0, 10) == 0.0 and S.p_value_from_r(-1.0, 10) == 0.0
    rng = np.random.default_rng(1)
    x = rng.normal(size=48)
    y = 0.5 * x + rng.normal(size=48)
    r, p = S.pearson(x, y)
    assert (r, p) == pytest.approx(scipy_stats.pearsonr(x, y), rel=1e-9)    # scipy: the same r and t-test
    assert S.pearson([1, 2, 3, 4], [2, 4, 6, 8.5])[0] > 0.99


def test_bad_input():
    with pytest.raises(ValueError, match=r"same number of runs .*'A': \(2, 1\), 'B': \(1, 1\)"):
        S.aggregate_targets({"A": [80, 90], "B": [70]}, {"A": 60, "B": 50})
    with pytest.raises(ValueError, match=r"no baseline score for target\(s\) \['cb'\]"):
        S.positive_transfers({"mnli": {"cb": 90.0}}, {"rte": 60.0})
    with pytest.raises(ValueError, match="n >= 3"):
        S.p_value_from_r(0.5, 2)
    with pytest.raises(ValueError, match="n >= 3"):
        S.pearson([1, 2], [3, 4])


def test_the_core_imports_nothing_from_experiments():
    """retrieval.py (and the other core modules) never reach into experiments/: callers import
    experiments.stats themselves."""
    code = ("import sys, data, retrieval, spot, t5_model; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'experiments'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    assert not hasattr(retrieval, "pearson") and not hasattr(retrieval, "positive_transfers")
