"""benchmarks/recipe_stop_split.py: recipe names are checked before any data loads or training starts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "recipe_stop_split.py"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports benchmarks/common.py
    try:
        spec = importlib.util.spec_from_file_location("recipe_stop_split", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_unknown_recipe_is_refused_with_the_known_names(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--dataset", "pneumoniamnist", "--recipes", "+ class-balanced", "per-image + typo"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "per-image + typo" in message and "per-image + class-balanced" in message


def test_every_recipe_changes_only_known_settings(script):
    """A misspelt key in VARIANTS would otherwise be ignored silently and train the base recipe."""
    from medhe.train.run import DATASET_DEFAULTS

    for dataset, variants in script.VARIANTS.items():
        known = set(DATASET_DEFAULTS[dataset]) | {"normalization"}
        assert set(script.BASES[dataset]) <= known
        for name, changes in variants.items():
            assert set(changes) <= known, (dataset, name)
            assert changes.get("normalization", "dataset") in ("dataset", "per_image"), (dataset, name)
