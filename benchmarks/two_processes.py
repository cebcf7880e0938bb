"""Both cores for one request: one evaluation in one process against the same evaluation shared
with a helper process (`medhe.runtime.split`), image by image in turn on the same keys.

For each model, `--limit` held-out images are encrypted (CKKS, 128-bit) and each is evaluated by
both executors one after the other (which goes first alternates); the table shows the medians, the paired median ratio and the
per-layer medians (where the shared layers gain), and that both agree with each other.

    python benchmarks/two_processes.py [--models br35h pneumoniamnist] [--limit 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import held_out_inputs, machine, print_table, seal_evaluation, write_json  # noqa: E402


def measure(name: str, limit: int, data_file: str | None) -> tuple[dict, list[dict]]:
    from medhe.runtime.executor import Executor
    from medhe.runtime.split import TwoProcessExecutor, shared_babies

    plan, client_backend, server_backend, one, cache, packer = seal_evaluation(name)
    two = TwoProcessExecutor(Executor(plan, server_backend, cache=cache))
    inputs, _, _, _ = held_out_inputs(name, limit, data_file)
    one_s, two_s, layers_one, layers_two, max_difference = [], [], [], [], 0.0
    try:
        for image_index, model_input in enumerate(inputs):
            ct = client_backend.encrypt(packer.pack(model_input))
            timings_one: dict[str, float] = {}
            timings_two: dict[str, float] = {}
            outputs, seconds = {}, {}
            # Which goes first alternates, so neither always meets the machine in the same state.
            for which in (("one", "two") if image_index % 2 == 0 else ("two", "one")):
                executor, timings = (one, timings_one) if which == "one" else (two, timings_two)
                start = time.perf_counter()
                outputs[which] = executor.run(ct, timings=timings)
                seconds[which] = time.perf_counter() - start
            out_one, out_two = outputs["one"], outputs["two"]
            one_s.append(seconds["one"])
            two_s.append(seconds["two"])
            layers_one.append(timings_one)
            layers_two.append(timings_two)
            slots = plan.output_layout.slots(plan.params.slot_count)
            difference = client_backend.decrypt(out_one)[slots] - client_backend.decrypt(out_two)[slots]
            max_difference = max(max_difference, float(np.abs(difference).max()))
    finally:
        two.close()
    # What one hand-over between the processes costs: SEAL's save and load of a fresh ciphertext.
    save_s, load_s = [], []
    for _ in range(5):
        start = time.perf_counter()
        data = server_backend.serialize(ct)
        save_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        server_backend.deserialize(data)
        load_s.append(time.perf_counter() - start)
    shared = {ins.layer for ins in plan.instructions if ins.kind == "linear" and shared_babies(ins, 0)}
    ratios = np.array(one_s) / np.array(two_s)
    summary = {"model": name, "images": len(inputs), "one_process_s": float(np.median(one_s)),
               "two_processes_s": float(np.median(two_s)), "paired_ratio_median": float(np.median(ratios)),
               "paired_ratio_min": float(ratios.min()), "paired_ratio_max": float(ratios.max()),
               "max_logit_difference": max_difference, "shared_layers": sorted(shared),
               "ciphertext_save_s": float(np.median(save_s)), "ciphertext_load_s": float(np.median(load_s)),
               "ciphertext_bytes": len(data)}
    rows = []
    for layer in layers_one[0]:
        a = float(np.median([t[layer] for t in layers_one]))
        b = float(np.median([t[layer] for t in layers_two]))
        rows.append({"model": name, "layer": layer, "shared": layer in shared, "one_process_s": a,
                     "two_processes_s": b, "ratio": a / b if b else 0.0})
    return summary, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["br35h", "pneumoniamnist"])
    parser.add_argument("--limit", type=int, default=20, help="encrypted images per model")
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    summaries, layer_rows = [], []
    for name in args.models:
        summary, rows = measure(name, args.limit, args.data_file)
        summaries.append(summary)
        layer_rows += rows
    print_table(layer_rows, [("model", "model", ""), ("layer", "layer", ""), ("shared", "shared", ""),
                             ("one_process_s", "1 process s", ".4f"), ("two_processes_s", "2 processes s", ".4f"),
                             ("ratio", "ratio", ".2f")])
    print()
    print_table(summaries, [("model", "model", ""), ("images", "images", "d"),
                            ("one_process_s", "1 process s (median)", ".3f"),
                            ("two_processes_s", "2 processes s (median)", ".3f"),
                            ("paired_ratio_median", "paired ratio (median)", ".2f"),
                            ("paired_ratio_min", "min", ".2f"), ("paired_ratio_max", "max", ".2f"),
                            ("max_logit_difference", "max logit difference", ".1e"),
                            ("ciphertext_save_s", "ct save s", ".4f"), ("ciphertext_load_s", "ct load s", ".4f")])
    write_json("two_processes.json", {"machine": machine(), "summaries": summaries, "layers": layer_rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
