"""Latency mode: one image per ciphertext, 128-bit security, the shipped default models.

    python benchmarks/bench_latency.py [--limit 20] [--datasets br35h pneumoniamnist]

Prints a table and writes benchmarks/results/latency.json. Targets (2 CPU cores): server
evaluation <= 1.0 s median per image; client encrypt + decrypt <= 0.1 s; upload <= 2 ciphertexts.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_parser, held_out_inputs, machine, peak_memory_bytes, print_table, write_json  # noqa: E402

TARGET_SERVER_S = 1.0
TARGET_CLIENT_S = 0.1
TARGET_UPLOAD_CIPHERTEXTS = 2


def run(dataset: str, limit: int, data_file: str | None) -> dict:
    from medhe.compiler import compile_model, format_report
    from medhe.nn.modeldir import resolve_model_dir
    from medhe.protocol.local import LocalSession, summarize

    inputs, labels, reference, source = held_out_inputs(dataset, limit, data_file)
    plan = compile_model(resolve_model_dir(dataset))
    print(f"\n== {dataset}: {source}, {limit} images ==")
    print(format_report(plan.report))
    session = LocalSession(plan)
    results = session.diagnose_many(inputs)
    row = summarize(results, reference, labels)
    row.update({
        "dataset": dataset, "eval_source": source,
        "client_encrypt_plus_decrypt_s": row["client_encrypt_median_s"] + row["client_decrypt_median_s"],
        "upload_ciphertexts": 1, "eval_key_bytes": session.eval_key_bytes, "keygen_s": session.keygen_s,
        "rotations_per_image": plan.rotation_count(), "rotation_keys": len(plan.rotation_steps()),
        "levels_before": plan.report["levels_before"], "levels_after": plan.report["levels_after"],
        "params": plan.params.to_dict(), "security_bits": plan.params.security_bits,
        "peak_memory_bytes": peak_memory_bytes(),
    })
    row["meets_targets"] = bool(row["server_latency_median_s"] <= TARGET_SERVER_S
                                and row["client_encrypt_plus_decrypt_s"] <= TARGET_CLIENT_S
                                and row["upload_ciphertexts"] <= TARGET_UPLOAD_CIPHERTEXTS)
    return row


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    args = parser.parse_args(argv)
    rows = [run(d, args.limit, args.data_file) for d in args.datasets]
    print()
    print_table(rows, [("dataset", "dataset", ""), ("n_encrypted", "images", "d"),
                       ("server_latency_median_s", "server s (med)", ".3f"),
                       ("server_latency_p90_s", "server s (p90)", ".3f"),
                       ("client_encrypt_plus_decrypt_s", "client s", ".3f"),
                       ("upload_bytes", "upload B", ",d"), ("eval_key_bytes", "eval keys B", ",d"),
                       ("agreement", "agreement", ".3f"), ("max_abs_logit_error", "max |dlogit|", ".2e"),
                       ("levels_after", "levels", "d"), ("rotations_per_image", "rotations", "d"),
                       ("peak_memory_bytes", "peak mem B", ",d"), ("meets_targets", "targets", "")])
    write_json("latency.json", {"machine": machine(), "targets": {"server_s": TARGET_SERVER_S,
               "client_s": TARGET_CLIENT_S, "upload_ciphertexts": TARGET_UPLOAD_CIPHERTEXTS}, "results": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
