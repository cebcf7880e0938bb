"""benchmarks/pareto.py: candidate names are checked before anything trains, and a per-data-set
candidate with its own input size keeps that size through the seed replicas."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pareto.py"


@pytest.fixture(scope="module")
def pareto():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports benchmarks/common.py
    try:
        spec = importlib.util.spec_from_file_location("pareto", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_unknown_or_untrainable_candidate_names_are_refused_before_training(pareto, capsys):
    for argv, expected in (
        (["--candidates", "bogus"], "unknown candidate(s) ['bogus']"),
        (["--datasets", "pneumoniamnist", "--candidates", "64x64 narrow 4,4"], "unknown candidate(s)"),
        (["--datasets", "br35h", "--candidates", "64x64 default"], "no candidate to train for br35h"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            pareto.main(argv + ["--work", "/nonexistent/never-made"])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert pareto.check_candidate_names(["pneumoniamnist", "br35h"], ["default", "64x64 narrow 4,4"]) is None


def test_a_data_set_takes_only_the_named_candidates_it_has(pareto):
    trained, compile_only = pareto.candidates_for("pneumoniamnist", ["default", "64x64 narrow 4,4"])
    assert list(trained) == ["default"] and compile_only == {}
    trained, compile_only = pareto.candidates_for("br35h", ["64x64 narrow 4,4", "64x64 default"])
    assert list(trained) == ["64x64 narrow 4,4"] and list(compile_only) == ["64x64 default"]
    assert "64x64 narrow 4,4" in pareto.candidates_for("br35h", None)[0]
    assert "64x64 narrow 4,4" not in pareto.candidates_for("pneumoniamnist", None)[0]


def test_seed_replicas_keep_a_candidates_input_size(pareto):
    assert pareto.replicas([((4, 4), 0, 64)], [0, 1, 2]) == [[((4, 4), 0, 64)], [((4, 4), 1, 64)], [((4, 4), 2, 64)]]
    assert pareto.replicas([(None, 0)], [0, 1]) == [[(None, 0)], [(None, 1)]]
    ensemble = pareto.CANDIDATES["ensemble 2x default"]
    assert pareto.replicas(ensemble, [0, 1, 2]) == [ensemble]  # an ensemble is one fixed set of members
