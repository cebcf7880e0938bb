"""Do the shipped models retrain from their recorded `medhe train` commands on this machine?

Each shipped single model (and each ensemble member that is not a copy of another shipped model)
records the command that trained it in its metrics.json. This script runs that command again into a
temporary directory (with this machine's PneumoniaMNIST file for --data-file) and compares: the
weights bit for bit (else the largest difference, relative to the largest weight of its tensor), and
the held-out report (Br35H grouped test, PneumoniaMNIST val: never trained on) of the retrained
model against the shipped one. `medhe` holds torch to AVX2 kernels on x86-64 Linux
(medhe/train/cpu_kernels.py), so a model trained so reproduces bit for bit on any such machine.

    python benchmarks/reproduce_shipped.py [--models br35h pneumoniamnist ...] [--data-file PATH.npz]
Writes benchmarks/results/reproduce_shipped.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

COMPARED = ("accuracy", "auc", "sensitivity", "specificity", "ece", "best_epoch",
            "accuracy_gap_relu_minus_poly_points")


def trained_models(names: list[str] | None) -> dict[str, Path]:
    """Shipped name (or NAME/member-K) -> model directory, one per distinct weights file."""
    from medhe.nn.modeldir import SHIPPED_MODELS, ensemble_members, shipped_models_dir

    found: dict[str, Path] = {}
    seen: set[str] = set()
    for name in SHIPPED_MODELS:
        directory = shipped_models_dir() / name
        members = ensemble_members(directory)
        for label, model_dir in ([(f"{name}/{m.name}", m) for m in members] if members else [(name, directory)]):
            digest = hashlib.sha256((model_dir / "weights.safetensors").read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                found[label] = model_dir
    if names:
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(found)}")
        found = {name: found[name] for name in names}
    return found


def retrain_command(recorded: str, out: Path, data_file: str | None) -> list[str]:
    """The recorded command with --out (and --data-file) replaced, run by this interpreter."""
    words = shlex.split(recorded)
    if words[:2] != ["medhe", "train"]:
        raise SystemExit(f"not a medhe train command: {recorded}")
    args, skip = [], False
    for word in words[2:]:
        if skip:
            skip = False
            continue
        if word in ("--out", "--data-file"):
            skip = True
            continue
        args.append(word)
    if "pneumoniamnist" in args:
        if data_file is None:
            raise SystemExit("PneumoniaMNIST models need --data-file PATH.npz (or the ../shared copy)")
        args += ["--data-file", data_file]
    return [sys.executable, "-m", "medhe.cli.main", "train", *args, "--out", str(out), "--no-progress"]


def weight_difference(shipped_dir: Path, retrained_dir: Path) -> tuple[bool, float]:
    """(same bytes, the largest difference in a conv or dense weight tensor relative to that tensor's
    largest magnitude). Biases and batch-norm statistics near zero would make a relative figure
    meaningless; the reports below show what the differences do."""
    from safetensors.numpy import load_file

    shipped, retrained = load_file(shipped_dir / "weights.safetensors"), load_file(retrained_dir / "weights.safetensors")
    identical = (shipped_dir / "weights.safetensors").read_bytes() == (retrained_dir / "weights.safetensors").read_bytes()
    relative = max(float(np.abs(retrained[k].astype(np.float64) - shipped[k]).max() / np.abs(shipped[k]).max())
                   for k in shipped if k.endswith(".weight") and shipped[k].ndim >= 2)
    return identical, relative


def main(argv: list[str] | None = None) -> int:
    from medhe.data.medmnist import default_pneumoniamnist_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="shipped names or NAME/member-K (default: all)")
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data_file = args.data_file or (str(default_pneumoniamnist_path()) if default_pneumoniamnist_path() else None)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label, model_dir in trained_models(args.models).items():
            shipped = json.loads((model_dir / "metrics.json").read_text())
            out = Path(tmp) / label.replace("/", "_")
            command = retrain_command(shipped["command"], out, data_file)
            begin = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{label}: retraining failed:\n{done.stderr[-2000:]}")
            retrained = json.loads((out / "metrics.json").read_text())
            identical, relative = weight_difference(model_dir, out)
            rows.append({"model": label, "command": shipped["command"], "weights_identical": identical,
                         "max_relative_weight_difference": relative,
                         "retrain_s": round(time.perf_counter() - begin, 1),
                         "cpu_capability": retrained["environment"].get("cpu_capability"),
                         "report_split": retrained["report_split"],
                         **{f"shipped_{key}": shipped.get(key) for key in COMPARED},
                         **{f"retrained_{key}": retrained.get(key) for key in COMPARED}})
            print(f"{label}: {'bit for bit' if identical else f'differs (max rel {relative:.1e})'} "
                  f"({rows[-1]['retrain_s']:.0f} s)", flush=True)
    print_table(rows, [("model", "model", ""), ("weights_identical", "same bits", ""),
                       ("max_relative_weight_difference", "max rel diff", ".1e"),
                       ("shipped_auc", "AUC shipped", ".5f"), ("retrained_auc", "AUC here", ".5f"),
                       ("shipped_accuracy", "ACC shipped", ".4f"), ("retrained_accuracy", "ACC here", ".4f"),
                       ("shipped_ece", "ECE shipped", ".4f"), ("retrained_ece", "ECE here", ".4f"),
                       ("retrain_s", "train s", ".0f")])
    write_json("reproduce_shipped.json", {"machine": machine(), "seconds": round(time.perf_counter() - started, 1),
                                          "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
