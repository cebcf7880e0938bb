"""Where the server's time goes: encrypted evaluation time per layer of the compiled plan.

For each model, `--limit` held-out images are encrypted (CKKS, 128-bit) and evaluated by the
server-side executor with per-layer timers; the table shows each layer's instructions, its
rotations (key rotations, with `--max-galois-keys`) and its median seconds and share.

    python benchmarks/profile_layers.py [--models br35h pneumoniamnist] [--limit 5] [--max-galois-keys N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import held_out_inputs, machine, print_table, seal_evaluation, write_json  # noqa: E402


def profile(name: str, limit: int, max_galois_keys: int | None, data_file: str | None) -> list[dict]:
    plan, client_backend, _, executor, _, packer = seal_evaluation(name, max_galois_keys=max_galois_keys)
    inputs, _, _, _ = held_out_inputs(name, limit, data_file)
    runs: list[dict[str, float]] = []
    for model_input in inputs:
        timings: dict[str, float] = {}
        executor.run(client_backend.encrypt(packer.pack(model_input)), timings=timings)
        runs.append(timings)
    chains = plan.rotation_chains()
    layers: dict[str, dict] = {}
    for ins in plan.instructions:
        row = layers.setdefault(ins.layer, {"model": name, "layer": ins.layer, "instructions": [], "rotations": 0})
        row["instructions"].append(ins.kind)
        row["rotations"] += plan.key_rotations(ins, chains)
    total = float(np.median([sum(run.values()) for run in runs]))
    rows = []
    for layer, row in layers.items():
        seconds = float(np.median([run.get(layer, 0.0) for run in runs]))
        rows.append({**row, "instructions": "+".join(row["instructions"]), "median_s": seconds,
                     "share": seconds / total if total else 0.0})
    rows.append({"model": name, "layer": "total", "instructions": "", "rotations": plan.report["rotations"],
                 "median_s": total, "share": 1.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["br35h", "pneumoniamnist"])
    parser.add_argument("--limit", type=int, default=5, help="encrypted images per model")
    parser.add_argument("--max-galois-keys", type=int, default=None)
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = [row for name in args.models for row in profile(name, args.limit, args.max_galois_keys, args.data_file)]
    print_table(rows, [("model", "model", ""), ("layer", "layer", ""), ("instructions", "instructions", ""),
                       ("rotations", "rotations", "d"), ("median_s", "median s", ".4f"), ("share", "share", ".1%")])
    write_json("profile_layers.json", {"machine": machine(), "max_galois_keys": args.max_galois_keys,
                                       "images_per_model": args.limit, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
