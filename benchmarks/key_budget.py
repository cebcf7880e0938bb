"""Key budget: evaluation-key size against server latency (`medhe compile --max-galois-keys / --max-key-mb`).

For each model and budget: the plan is compiled with at most that many rotation keys (none = one
key per rotation step), a client makes its keys, the server evaluates `--limit` held-out images
encrypted (CKKS, 128-bit) and the decrypted logits are checked against the plaintext model. The
budgets take turns image by image (same images, same stretch of the machine's time).

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
    """'none' (one key per step), '12' (at most 12 Galois keys), '150MB' (keys that fit 150 MB) or
    'default' (what `medhe compile` does without a budget)."""
    if text == "default":
        return {}
    if text == "none":
        return {"max_key_mb": None}
    if text.upper().endswith("MB"):
        return {"max_key_mb": float(text[:-2])}
    return {"max_galois_keys": int(text)}


def measure(name: str, budgets: list[str], limit: int, data_file: str | None) -> list[dict]:
    """One row per budget. The budgets take turns image by image, so a change in the machine's
    speed during the run (common on shared machines) falls on every budget alike."""
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    inputs, _, reference, _ = held_out_inputs(name, limit, data_file)
    setups = []
    for budget in budgets:
        plan = compile_model(resolve_model_dir(name), **_budget(budget))
        client, server = Client(plan.client_spec()), Server(plan)
        start = time.perf_counter()
        keys = client.evaluation_keys()
        keygen_s = time.perf_counter() - start
        server.register_keys(keys)
        setups.append({"budget": budget, "plan": plan, "client": client, "server": server, "key_bytes": len(keys),
                       "keygen_s": keygen_s, "latencies": [], "error": 0.0, "agree": 0})
    for model_input, expected in zip(inputs, reference):
        for setup in setups:
            message = setup["client"].encrypt_input(model_input)
            start = time.perf_counter()
            result = setup["server"].evaluate(message)
            setup["latencies"].append(time.perf_counter() - start)
            logits = setup["client"].decrypt_logits(result)
            setup["error"] = max(setup["error"], float(np.abs(logits - expected).max()))
            setup["agree"] += int(logits.argmax() == expected.argmax())
    return [{"model": name, "budget": s["budget"], "galois_keys": len(s["plan"].galois_steps()),
             "eval_keys_mb": s["key_bytes"] / 2**20, "rotations": s["plan"].report["rotations"],
             "server_s_median": float(np.median(s["latencies"])), "keygen_s": s["keygen_s"],
             "max_logit_error": s["error"], "agreement": s["agree"] / len(s["latencies"]),
             "images": len(s["latencies"])} for s in setups]


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
        for row in measure(name, args.budgets, args.limit, args.data_file):
            print(f"{name} budget {row['budget']}: {row['eval_keys_mb']:.0f} MB, {row['server_s_median']:.3f} s",
                  flush=True)
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
