"""Throughput mode: slots across images, one full batch (N/2 = 8192 images) per run.

    python benchmarks/bench_throughput.py [--dataset pneumoniamnist] [--model NAME] [--batch 8192]
                                          [--client-workers N]

The batch is filled with held-out images (repeated to fill all slots when the split is smaller:
the cost does not depend on the pixel values); accuracy and agreement are reported on the
distinct images. The client encrypts the batch in its own process with its secret key, seeded (the
default of `Client.encrypt_batch`), and once more with --client-workers helper processes under the
public key (default: one per core; twice the bytes), for comparison; it writes the seeded message
to a file; the server runs in a process of its own and reads it from there one ciphertext
at a time, as `medhe serve` does with an upload, so its peak memory is its own. Prints a table and
writes benchmarks/results/throughput.json. Targets: amortized server time <= 10 ms per image on a
full batch, server peak memory <= 4 GB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import eval_images, machine, peak_memory_bytes, print_table, write_json  # noqa: E402

TARGET_MS_PER_IMAGE = 10.0
TARGET_SERVER_PEAK_BYTES = 4 * 10**9


def _serve_batch(plan_dir: str, keys: bytes, message_path: str, result_path: str, connection) -> None:
    """The server's process: keys registered, the batch read from its file, the result written."""
    from medhe.plan import BatchPlan
    from medhe.protocol.server import Server

    server = Server(BatchPlan.load(plan_dir))
    server.register_keys(keys)
    start = time.perf_counter()
    Path(result_path).write_bytes(server.evaluate_batch(Path(message_path)))
    connection.send({"server_s": time.perf_counter() - start, "server_peak_memory_bytes": peak_memory_bytes()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pneumoniamnist", choices=("br35h", "pneumoniamnist"))
    parser.add_argument("--model", default=None, help="shipped model name or directory of that data set (default: "
                                                      "the data set's, e.g. br35h-64 for --dataset br35h)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: all N/2 slots)")
    parser.add_argument("--data-file", default=None)
    parser.add_argument("--client-workers", type=int, default=None,
                        help="helper processes for the comparison run under the public key (default: one per core)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    from medhe.compiler.batch import compile_batch
    from medhe.errors import ConfigError
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.protocol.client import Client

    model_dir = resolve_model_dir(args.model or args.dataset)
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

    import multiprocessing
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="medhe-throughput-"))
    plan.save(work / "plan")
    t0 = time.perf_counter()
    client = Client(plan.client_spec())
    keys = client.evaluation_keys()
    t1 = time.perf_counter()
    message = client.encrypt_batch(inputs)  # the default: this process, secret key, seeded
    t2 = time.perf_counter()
    upload_bytes = len(message)
    (work / "batch.msg").write_bytes(message)
    del message
    client_peak_memory_bytes = peak_memory_bytes()  # the default path's peak, before the comparison
    helpers = max(2, args.client_workers or os.cpu_count() or 1)
    start = time.perf_counter()
    try:  # the same batch by helper processes under the public key, for comparison
        helpers_upload_bytes = len(client.encrypt_batch(inputs, workers=helpers))
        helpers_s = time.perf_counter() - start
    except ConfigError as exc:  # over the message limit at public-key size (a 64x64 input)
        print(f"helpers: {exc}")
        helpers_upload_bytes = helpers_s = None
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    server = context.Process(target=_serve_batch, args=(str(work / "plan"), keys, str(work / "batch.msg"),
                                                        str(work / "result.msg"), send))
    try:
        server.start()
        send.close()  # the child holds the only sending end: its death ends recv() with EOFError
        try:
            measured = receive.recv()
        except EOFError:
            server.join()
            raise SystemExit(f"the server process failed (exit code {server.exitcode})") from None
        server.join()
        result = (work / "result.msg").read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t3 = time.perf_counter()
    logits = client.decrypt_batch(result)
    t4 = time.perf_counter()

    pred = logits[:distinct].argmax(1)
    row = {
        "dataset": args.dataset, "model": args.model or args.dataset, "batch_images": batch, "distinct_images": distinct,
        "server_s": measured["server_s"], "server_ms_per_image": measured["server_s"] / batch * 1000,
        "client_encrypt_s": t2 - t1, "client_helpers": helpers, "client_encrypt_helpers_s": helpers_s,
        "upload_bytes_helpers": helpers_upload_bytes,
        "client_decrypt_s": t4 - t3, "keygen_s": t1 - t0,
        "upload_bytes": upload_bytes, "upload_ciphertexts": plan.input_features, "download_bytes": len(result),
        "eval_key_bytes": len(keys),
        "agreement": float((pred == reference.argmax(1)).mean()),
        "encrypted_accuracy": float((pred == labels[:distinct]).mean()),
        "max_abs_logit_error": float(np.abs(logits[:distinct] - reference).max()),
        "levels": plan.depth, "params": plan.params.to_dict(), "security_bits": plan.params.security_bits,
        "server_peak_memory_bytes": measured["server_peak_memory_bytes"],
        "client_peak_memory_bytes": client_peak_memory_bytes,
    }
    row["meets_speed_target"] = bool(row["server_ms_per_image"] <= TARGET_MS_PER_IMAGE)
    row["meets_memory_target"] = bool(row["server_peak_memory_bytes"] <= TARGET_SERVER_PEAK_BYTES)
    print_table([row], [("batch_images", "images", "d"), ("server_s", "server s", ".1f"),
                        ("server_ms_per_image", "ms/image", ".2f"), ("client_encrypt_s", "encrypt s", ".1f"),
                        ("upload_bytes", "upload B", ",d"), ("client_encrypt_helpers_s", "helpers s", ".1f"),
                        ("upload_bytes_helpers", "helpers upload B", ",d"), ("agreement", "agreement", ".4f"),
                        ("encrypted_accuracy", "enc acc", ".4f"), ("max_abs_logit_error", "max |dlogit|", ".2e"),
                        ("server_peak_memory_bytes", "server peak B", ",d"),
                        ("client_peak_memory_bytes", "client peak B", ",d"),
                        ("meets_speed_target", "<=10 ms", ""), ("meets_memory_target", "<=4 GB", "")])
    write_json("throughput.json", {"machine": machine(), "target_ms_per_image": TARGET_MS_PER_IMAGE,
                                   "target_server_peak_bytes": TARGET_SERVER_PEAK_BYTES, "results": [row]}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
