"""Shared fixtures: seeding (printed on failure), paths to ../shared data, tier markers."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
PNEUMONIAMNIST_NPZ = SHARED_DIR / "data" / "pneumoniamnist" / "pneumoniamnist.npz"


@pytest.fixture(autouse=True)
def seeded(request):
    """Seed numpy, random and torch for every test; the seed is in the report of a failure."""
    seed = int(os.environ.get("MEDHE_TEST_SEED", "1234"))
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass
    request.node.user_properties.append(("seed", seed))
    yield seed


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        seed = dict(item.user_properties).get("seed")
        if seed is not None:
            item.add_report_section("call", "seed", f"reproduce with MEDHE_TEST_SEED={seed}")


@pytest.fixture
def pneumoniamnist_npz() -> Path:
    if not PNEUMONIAMNIST_NPZ.is_file():
        pytest.skip(f"PneumoniaMNIST not available at {PNEUMONIAMNIST_NPZ} (../shared is absent)")
    return PNEUMONIAMNIST_NPZ


_SUMMARIES: list[str] = []


@pytest.fixture
def report_line():
    """Lines a test wants in the terminal summary (e.g. measured encrypted-vs-plaintext errors)."""
    return _SUMMARIES.append


def pytest_terminal_summary(terminalreporter):
    if _SUMMARIES:
        terminalreporter.section("medhe measurements")
        for line in _SUMMARIES:
            terminalreporter.write_line(line)
