"""Shared fixtures: the real test data beside the repository and generated particle sets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import REAL, make_stack, simple_set, write_star  # noqa: E402


@pytest.fixture(scope="session")
def real() -> Path:
    """The folder of real test inputs (../shared/data/real beside the repository); read only."""
    if not (REAL / "README.md").is_file():
        pytest.skip(f"real test data not found at {REAL} (expected ../shared/data/real beside the repository, "
                    "or set DPARTICLES_TEST_DATA)")
    return REAL


@pytest.fixture
def make_stack_():
    """``make_stack(path, n, box, dtype, seed)``: write an MRC stack with mrcfile, return its data."""
    return make_stack


@pytest.fixture
def write_star_():
    """``write_star(path, particles, optics=None, ...)``: write a 3.0 or 3.1 STAR file."""
    return write_star


@pytest.fixture
def particle_set(tmp_path: Path):
    """A small generated 3.1 set: two stacks of 6 images of 16x16 float32, one optics group."""
    return simple_set(tmp_path / "project")
