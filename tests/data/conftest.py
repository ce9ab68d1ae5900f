"""Fixtures for the data plane: small phantoms and a corpus of broken inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import make_broken_corpus

from raymim.data.synth import generate_phantoms


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """6 phantoms of 32^3 (3 sites: RAS, LPS, LAS on disk); returns the manifest path."""
    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), cases=6, size=32, seed=1)


@pytest.fixture(scope="session")
def broken_corpus(tmp_path_factory, request) -> Path:
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("broken") / "corpus"
    (root.parent / "outside.nii.gz").write_bytes(b"x")
    return make_broken_corpus(root, SHARED_DATA if SHARED_DATA.is_dir() else None)
