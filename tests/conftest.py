"""Shared fixtures. Tests read the real data in ../shared/data (never copied into the project)."""
import os
from pathlib import Path

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
