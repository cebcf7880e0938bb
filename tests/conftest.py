"""Shared fixtures: seeding (printed on failure), paths to ../shared data, tier markers."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
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


MEASUREMENT = "medhe measurement"


@pytest.fixture
def report_line(request):
    """Lines a test wants in the terminal summary (e.g. measured encrypted-vs-plaintext errors).
    They travel in the test's report, so they reach the summary from pytest-xdist workers too."""
    return lambda line: request.node.user_properties.append((MEASUREMENT, line))


def pytest_terminal_summary(terminalreporter):
    lines = [value for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, value in getattr(report, "user_properties", ()) if name == MEASUREMENT]
    if lines:
        terminalreporter.section("medhe measurements")
        for line in lines:
            terminalreporter.write_line(line)


RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_cluster(tmp_path):
    """A local Ray cluster of 2 CPUs started for the test (its address); skipped without Ray.
    `ray stop --force` at the end stops every Ray process of the machine, so tests using this
    fixture carry `@pytest.mark.xdist_group("ray")`: pytest-xdist (`--dist loadgroup`) runs them one after another."""
    pytest.importorskip("ray", reason="Ray is the optional extra medhe[cluster]")
    from tests.service_process import free_port

    if not Path(RAY).is_file():
        pytest.skip("the ray command is not installed beside this Python")
    port = free_port()
    # A short temp dir: Ray's socket paths must stay under the 107-character limit.
    temp_dir = Path("/tmp") / f"medhe-ray-{port}"
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--port", str(port), "--include-dashboard=false",
                    "--disable-usage-stats", "--temp-dir", str(temp_dir)], check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=180)
        shutil.rmtree(temp_dir, ignore_errors=True)
