"""Encrypted-model mode against plain-weight mode, same run, same images, one core.

    python benchmarks/bench_encrypted_model.py [--limit 20] [--datasets br35h pneumoniamnist]

One clinic (keys made once) and two servers: one holds the weights in clear, the other only the
ciphertexts the model owner made under the clinic's public key. Every image's ciphertext goes to
both, alternately, so drift of the machine hits both modes alike. The process is pinned to one
CPU (SEAL evaluates on one core anyway; pinning keeps the number honest on a busy machine).

Prints a table and writes benchmarks/results/encrypted_model.json. Targets: encrypted-model
latency <= 2.5x plain-weight latency, and <= 1.5 s per image on one core.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_parser, held_out_inputs, machine, peak_memory_bytes, print_table, write_json  # noqa: E402

TARGET_RATIO = 2.5
TARGET_ENCRYPTED_S = 1.5


def run(dataset: str, limit: int, data_file: str | None) -> dict:
    from medhe.compiler import compile_model, format_report
    from medhe.nn.modeldir import resolve_model_dir
    from medhe.protocol.client import Client
    from medhe.protocol.owner import ModelOwner
    from medhe.protocol.server import Server

    inputs, labels, reference, source = held_out_inputs(dataset, limit, data_file, spread=True)
    plan = compile_model(resolve_model_dir(dataset))
    print(f"\n== {dataset}: {source}, {limit} images ==")
    print(format_report(plan.report))

    client = Client(plan.client_spec())
    keys = client.evaluation_keys()
    plain = Server(plan)
    plain.register_keys(keys)
    owner = ModelOwner(progress=True)
    start = time.perf_counter()
    encrypted_model = owner.encrypt_model(plan, client.public_key())
    encrypt_s = time.perf_counter() - start
    encrypted = Server(plan.without_weights(), encrypted_model=True)
    encrypted.register_keys(keys)
    start = time.perf_counter()
    encrypted.register_encrypted_model(encrypted_model)
    load_s = time.perf_counter() - start

    times = {"plain": [], "encrypted": []}
    logits = {"plain": [], "encrypted": []}
    for x in inputs:
        message = client.encrypt_input(x)
        for mode, server in (("plain", plain), ("encrypted", encrypted)):
            t0 = time.perf_counter()
            result = server.evaluate(message)
            times[mode].append(time.perf_counter() - t0)
            logits[mode].append(client.decrypt_logits(result))
    row = {"dataset": dataset, "eval_source": source, "n": limit,
           "weight_operands": plan.weight_operand_count(),
           "relinearizations": plan.report["relinearizations"],
           "encrypted_model_bytes": len(encrypted_model), "owner_encrypt_s": encrypt_s,
           "server_model_load_s": load_s, "eval_key_bytes": len(keys),
           "params": plan.params.to_dict(), "security_bits": plan.params.security_bits}
    for mode in ("plain", "encrypted"):
        got = np.stack(logits[mode])
        row[f"{mode}_server_s_median"] = float(np.median(times[mode]))
        row[f"{mode}_server_s_p90"] = float(np.percentile(times[mode], 90))
        row[f"{mode}_agreement"] = float((got.argmax(1) == reference.argmax(1)).mean())
        row[f"{mode}_accuracy"] = float((got.argmax(1) == labels).mean())
        row[f"{mode}_max_abs_logit_error"] = float(np.abs(got - reference).max())
    row["latency_ratio"] = row["encrypted_server_s_median"] / row["plain_server_s_median"]
    row["peak_memory_bytes"] = peak_memory_bytes()
    row["meets_targets"] = bool(row["latency_ratio"] <= TARGET_RATIO
                                and row["encrypted_server_s_median"] <= TARGET_ENCRYPTED_S)
    return row


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one CPU")
    args = parser.parse_args(argv)
    cores = "all"
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        cores = f"1 (cpu {cpu})"
    rows = [run(d, args.limit, args.data_file) for d in args.datasets]
    print()
    print_table(rows, [("dataset", "dataset", ""), ("n", "images", "d"),
                       ("plain_server_s_median", "plain s", ".3f"),
                       ("encrypted_server_s_median", "enc-model s", ".3f"),
                       ("latency_ratio", "ratio", ".2f"),
                       ("encrypted_server_s_p90", "enc p90 s", ".3f"),
                       ("encrypted_model_bytes", "enc model B", ",d"), ("owner_encrypt_s", "owner s", ".1f"),
                       ("encrypted_agreement", "agreement", ".3f"),
                       ("plain_max_abs_logit_error", "plain |dl|", ".1e"),
                       ("encrypted_max_abs_logit_error", "enc |dl|", ".1e"),
                       ("peak_memory_bytes", "peak mem B", ",d"), ("meets_targets", "targets", "")])
    write_json("encrypted_model.json", {"machine": {**machine(), "cores_used": cores},
                                        "targets": {"latency_ratio": TARGET_RATIO, "encrypted_s": TARGET_ENCRYPTED_S},
                                        "results": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
