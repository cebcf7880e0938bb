"""Throughput mode: slots across images, one full batch (N/2 = 8192 images) per run.

    python benchmarks/bench_throughput.py [--dataset pneumoniamnist] [--batch 8192]

The batch is filled with held-out images (repeated to fill all slots when the split is smaller:
the cost does not depend on the pixel values); accuracy and agreement are reported on the
distinct images. Prints a table and writes benchmarks/results/throughput.json. Target: amortized
server time <= 20 ms per image on a full batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import eval_images, machine, peak_memory_bytes, print_table, write_json  # noqa: E402

TARGET_MS_PER_IMAGE = 20.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pneumoniamnist", choices=("br35h", "pneumoniamnist"))
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: all N/2 slots)")
    parser.add_argument("--data-file", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    from medhe.compiler.batch import compile_batch
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.protocol.client import Client
    from medhe.protocol.server import Server

    model_dir = resolve_model_dir(args.dataset)
    model, card = load_model(model_dir)
    plan = compile_batch(model_dir)
    batch = args.batch or plan.batch_size
    images, labels, source = eval_images(args.dataset, card.preprocessing, args.data_file)
    distinct = min(len(images), batch)
    reps = int(np.ceil(batch / len(images)))
    inputs = np.concatenate([card.preprocessing.apply_batch(images)] * reps)[:batch]
    with torch.no_grad():
        reference = model(torch.tensor(inputs[:distinct])).double().numpy()
    print(f"== {args.dataset}: batch of {batch} ({distinct} distinct held-out images from {source}) ==")
    print(f"depth {plan.multiplicative_depth} in {plan.depth} rescales; {plan.report['multiplications']:,} plaintext multiplications and "
          f"{plan.report['squares']:,} squares per batch, no rotations")

    t0 = time.perf_counter()
    client = Client(plan.client_spec())
    keys = client.evaluation_keys()
    server = Server(plan)
    server.register_keys(keys)
    t1 = time.perf_counter()
    message = client.encrypt_batch(inputs)
    t2 = time.perf_counter()
    result = server.evaluate_batch(message)
    t3 = time.perf_counter()
    logits = client.decrypt_batch(result)
    t4 = time.perf_counter()

    pred = logits[:distinct].argmax(1)
    row = {
        "dataset": args.dataset, "batch_images": batch, "distinct_images": distinct,
        "server_s": t3 - t2, "server_ms_per_image": (t3 - t2) / batch * 1000,
        "client_encrypt_s": t2 - t1, "client_decrypt_s": t4 - t3, "keygen_s": t1 - t0,
        "upload_bytes": len(message), "upload_ciphertexts": plan.input_features, "download_bytes": len(result),
        "eval_key_bytes": len(keys),
        "agreement": float((pred == reference.argmax(1)).mean()),
        "encrypted_accuracy": float((pred == labels[:distinct]).mean()),
        "max_abs_logit_error": float(np.abs(logits[:distinct] - reference).max()),
        "levels": plan.depth, "params": plan.params.to_dict(), "security_bits": plan.params.security_bits,
        "peak_memory_bytes": peak_memory_bytes(),
    }
    row["meets_target"] = bool(row["server_ms_per_image"] <= TARGET_MS_PER_IMAGE)
    print_table([row], [("batch_images", "images", "d"), ("server_s", "server s", ".1f"),
                        ("server_ms_per_image", "ms/image", ".2f"), ("client_encrypt_s", "encrypt s", ".1f"),
                        ("upload_bytes", "upload B", ",d"), ("agreement", "agreement", ".4f"),
                        ("encrypted_accuracy", "enc acc", ".4f"), ("max_abs_logit_error", "max |dlogit|", ".2e"),
                        ("peak_memory_bytes", "peak mem B", ",d"), ("meets_target", "target", "")])
    write_json("throughput.json", {"machine": machine(), "target_ms_per_image": TARGET_MS_PER_IMAGE,
                                   "results": [row]}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
