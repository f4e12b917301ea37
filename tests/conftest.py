"""Shared test helpers: where the real data in `<repo>/../shared/data` lives."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The repo's packages (keras_vit, pipelines) import from a checkout without installing it.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def shared_data(*parts: str) -> Path:
    """Path of a file under shared/data; skips the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (see shared/data/SOURCES.md)")
    return path
