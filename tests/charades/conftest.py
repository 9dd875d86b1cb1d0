"""Fixtures of the Charades tests (helpers live in charades_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from charades_helpers import data_file


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tensors here are tiny: with several threads on a busy 2-core machine, OpenMP
    start-up and contention cost more than the work (10x slower), so use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def official_test():
    from fieldlib.models.charades import read_annotations

    return read_annotations(data_file("Charades_v1_test.csv"))


@pytest.fixture(scope="session")
def official_train():
    from fieldlib.models.charades import read_annotations

    return read_annotations(data_file("Charades_v1_train.csv"), reversed_intervals="keep")
