"""Fixtures of the Charades tests (helpers live in charades_helpers.py)."""

from __future__ import annotations

import pytest
from charades_helpers import data_file


@pytest.fixture(scope="session")
def official_test():
    from fieldlib.models.charades import read_annotations

    return read_annotations(data_file("Charades_v1_test.csv"))


@pytest.fixture(scope="session")
def official_train():
    from fieldlib.models.charades import read_annotations

    return read_annotations(data_file("Charades_v1_train.csv"), reversed_intervals="keep")
