"""Key budget: evaluation-key size against server latency (`medhe compile --max-galois-keys / --max-key-mb`).

For each model and budget: the plan is compiled with at most that many rotation keys (none = one
key per rotation step), a client makes its keys, the server evaluates `--limit` held-out images
encrypted (CKKS, 128-bit) and the decrypted logits are checked against the plaintext model.

    python benchmarks/key_budget.py [--models br35h pneumoniamnist] [--budgets none 150MB 12] [--limit 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import held_out_inputs, machine, print_table, write_json  # noqa: E402

KEY_TARGET_MB = 150


def _budget(text: str) -> dict:
    """'none' (one key per step), '12' (at most 12 Galois keys) or '150MB' (keys that fit 150 MB)."""
    if text == "none":
        return {}
    if text.upper().endswith("MB"):
        return {"max_key_mb": float(text[:-2])}
    return {"max_galois_keys": int(text)}


def measure(name: str, budget: str, limit: int, data_file: str | None) -> dict:
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    inputs, _, reference, _ = held_out_inputs(name, limit, data_file)
    plan = compile_model(resolve_model_dir(name), **_budget(budget))
    client, server = Client(plan.client_spec()), Server(plan)
    start = time.perf_counter()
    keys = client.evaluation_keys()
    keygen_s = time.perf_counter() - start
    server.register_keys(keys)
    latencies, error, agree = [], 0.0, 0
    for model_input, expected in zip(inputs, reference):
        message = client.encrypt_input(model_input)
        start = time.perf_counter()
        result = server.evaluate(message)
        latencies.append(time.perf_counter() - start)
        logits = client.decrypt_logits(result)
        error = max(error, float(np.abs(logits - expected).max()))
        agree += int(logits.argmax() == expected.argmax())
    return {"model": name, "budget": budget, "galois_keys": len(plan.galois_steps()),
            "eval_keys_mb": len(keys) / 2**20, "rotations": plan.report["rotations"],
            "server_s_median": float(np.median(latencies)), "keygen_s": keygen_s,
            "max_logit_error": error, "agreement": agree / len(latencies), "images": len(latencies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["br35h", "pneumoniamnist"])
    parser.add_argument("--budgets", nargs="+", default=["none", "150MB", "12"],
                        help="key budgets: 'none' = one key per step, N = at most N Galois keys, "
                             "150MB = the keys that fit 150 MB (2**20 bytes)")
    parser.add_argument("--limit", type=int, default=8, help="encrypted images per configuration")
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for budget in args.budgets:
        try:
            _budget(budget)
        except ValueError:
            parser.error(f"--budgets: expected none, a key count or a size like 150MB, got {budget!r}")
    rows = []
    for name in args.models:
        for budget in args.budgets:
            row = measure(name, budget, args.limit, args.data_file)
            print(f"{name} budget {budget}: {row['eval_keys_mb']:.0f} MB, {row['server_s_median']:.3f} s", flush=True)
            rows.append(row)
    print_table(rows, [("model", "model", ""), ("budget", "budget", ""), ("galois_keys", "keys", "d"),
                       ("eval_keys_mb", "eval keys MB", ".1f"), ("rotations", "rotations", "d"),
                       ("server_s_median", "server s", ".3f"), ("max_logit_error", "max err", ".1e"),
                       ("agreement", "agreement", ".2f")])
    write_json("key_budget.json", {"machine": machine(), "target_eval_keys_mb": KEY_TARGET_MB, "rows": rows},
               args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
