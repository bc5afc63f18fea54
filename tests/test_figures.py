"""experiments/figures.py: one figure of each kind drawn from the paper's Table 6 (paper_numbers.py)."""
import numpy as np
import pytest

import retrieval as R
from experiments import figures
from experiments import paper_numbers as P
from experiments.stats import pearson
from tests.test_stats import _table6


def _is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_from_table6(tmp_path):
    pytest.importorskip("matplotlib")
    matrix, baseline = _table6()
    rer = np.array([[R.relative_error_reduction(matrix[s][t], baseline[t]) for t in P.TARGETS]
                    for s in P.SOURCES])
    assert _is_png(figures.plot_transfer_heatmap(rer, P.SOURCES, P.TARGETS, tmp_path / "fig3.png"))
    # Table 6 has no prompts, so the clustered heatmap here uses the sources' transfer profiles
    # (score - baseline over the 10 targets): cosine similarity between sources.
    profiles = np.array([[matrix[s][t] - baseline[t] for t in P.TARGETS] for s in P.SOURCES])
    unit = profiles / np.linalg.norm(profiles, axis=1, keepdims=True)
    sim = unit @ unit.T
    assert _is_png(figures.plot_similarity_clustermap(sim, P.SOURCES, tmp_path / "fig4.png"))
    # Scatter: does a source's mean transfer to the other 9 targets predict its transfer to this one?
    panels = {t: (np.delete(rer, j, axis=1).mean(1), rer[:, j]) for j, t in enumerate(P.TARGETS)}
    stats = figures.plot_similarity_vs_transfer(panels, tmp_path / "fig5.png",
                                                xlabel="mean RER on other targets")
    assert _is_png(tmp_path / "fig5.png") and set(stats) == set(P.TARGETS)
    assert stats["CB"] == pytest.approx(pearson(*panels["CB"]))
