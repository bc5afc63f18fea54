"""Shared fixtures. Tests read the real data in ../shared/data (never copied into the project)."""
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPOT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The directory ../shared/data (or $SPOT_SHARED_DATA); skips when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}: set SPOT_SHARED_DATA to the directory holding "
                    "t5_spiece.model, glue/, superglue/ and prompt_tuning_release/")
    return SHARED_DATA


# Float comparisons derive their tolerance from the arithmetic, never from what one machine printed: two
# float32 computations of the same value in another order (another CPU, thread count or blocking) differ by
# at most about n * eps * (the size of the terms), n being the number of roundings on the longest path to the
# result.
EPS32 = float(np.finfo(np.float32).eps)


def f32_atol(reference, n: int) -> float:
    """Absolute tolerance for a float32 result accumulated through n roundings, at the reference's scale."""
    return n * EPS32 * float(np.max(np.abs(np.asarray(reference, np.float64))))


def network_roundings(cfg, positions: int) -> int:
    """Roundings on the longest path through a T5 forward (and its backward): each of the encoder + decoder
    layers and the logits sums over at most max(D, F, positions) terms."""
    return (cfg.num_layers + cfg.num_decoder_layers + 1) * max(cfg.d_model, cfg.d_ff, positions)
