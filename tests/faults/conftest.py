"""Fixtures shared by the fault tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A real head run (logreg on synthetic blobs) and the cache it accepts; one per test module."""
    from fxtl.heads.fitting import fit_head

    from ..test_heads import write_synthetic_cache

    home = tmp_path_factory.mktemp("genuine")
    cache = write_synthetic_cache(home / "blobs.h5")
    return fit_head(cache, model="logreg", search=False, cache_dir=home).run_dir, cache
