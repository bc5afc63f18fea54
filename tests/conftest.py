"""Shared fixtures. Tests read the public data files: ../shared/data beside the checkout (CI), else the cache
that `python3 data.py fetch` fills (never copied into the project)."""
import os
from pathlib import Path

import numpy as np
import pytest

import data

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPOT_SHARED_DATA", ROOT.parent / "shared" / "data"))
if SHARED_DATA.is_dir():  # the scripts' defaults (data.data_root(): --tiny, released_prompts.py) read it too
    os.environ.setdefault("SPOT_DATA", str(SHARED_DATA))


def find_data(shared=SHARED_DATA):
    """(folder, None) or (None, why): $SPOT_SHARED_DATA or ../shared/data (CI), else the cache
    ($SPOT_DATA) if complete, else the cache fetched now from $SPOT_DATA_MIRROR or the files' public homes."""
    if shared.is_dir():
        return shared, None
    try:
        return data.fetch(), None
    except data.FetchError as e:
        return None, (f"no test data: {e}. Fetch it with `{data.FETCH_HINT}` (into {data.data_root()}, or "
                      "$SPOT_DATA), or set SPOT_SHARED_DATA to a folder laid out like it")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of the public data files (find_data); skips, naming the fetch command, if there is none."""
    folder, why = find_data()
    if folder is None:
        pytest.skip(why)
    return folder


# Float comparisons derive their tolerance from the arithmetic, never from what one machine printed: two
# float32 computations of the same value in another order (another CPU, thread count or blocking) differ by
# at most about n * eps * (the size of the terms), n being the number of roundings on the longest path to the
# result.
# The oracles' install line, named by every test that skips without them (README: the test command)
ORACLE_INSTALL = ("python3 -m pip install -e '.[test,oracle]' "
                  "--extra-index-url https://download.pytorch.org/whl/cpu")
EPS32 = float(np.finfo(np.float32).eps)


def f32_atol(reference, n: int) -> float:
    """Absolute tolerance for a float32 result accumulated through n roundings, at the reference's scale."""
    return n * EPS32 * float(np.max(np.abs(np.asarray(reference, np.float64))))


def network_roundings(cfg, positions: int) -> int:
    """Roundings on the longest path through a T5 forward (and its backward): each of the encoder + decoder
    layers and the logits sums over at most max(D, F, positions) terms."""
    return (cfg.num_layers + cfg.num_decoder_layers + 1) * max(cfg.d_model, cfg.d_ff, positions)
