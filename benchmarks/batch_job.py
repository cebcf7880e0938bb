"""Batch jobs (`medhe batch`): one job of several full throughput-mode batches, evaluated in this
process, in 2 local worker processes, and as Ray tasks on a local Ray cluster, same job files.

    python benchmarks/batch_job.py [--dataset pneumoniamnist] [--batches 2] [--runners 1 2 ray]

Each batch is N/2 = 8192 held-out images (the split repeated to fill the slots: the cost does not
depend on pixel values), 128-bit CKKS; the clinic encrypts the job once, every runner evaluates it
from scratch, and each run's results are decrypted and compared with the plaintext model on the
distinct images. Prints a table and writes benchmarks/results/batch_job.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import held_out_inputs, machine, print_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pneumoniamnist", choices=["pneumoniamnist", "br35h"])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--runners", nargs="+", default=["1", "2", "ray"],
                        help="1 or 2 (local worker processes) or ray (a local Ray cluster)")
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from medhe.compiler.batch import compile_batch
    from medhe.nn.io import resolve_model_dir
    from medhe.protocol.batch_job import decrypt_job, encrypt_job, run_job
    from medhe.protocol.keydir import make_key_directory

    inputs, labels, reference, source = held_out_inputs(args.dataset, 10**6, args.data_file)
    plan = compile_batch(resolve_model_dir(args.dataset))
    per_batch = plan.batch_size
    total = per_batch * args.batches
    repeat = np.resize(np.arange(len(inputs)), total)
    work = Path(tempfile.mkdtemp(prefix="medhe-batch-job-"))
    try:
        plan.save(work / "plan")
        client = make_key_directory(plan.client_spec(), work / "keys")
        start = time.perf_counter()
        # Images as arrays already preprocessed: the Client's preprocess of an array in [0, 1] would
        # crop and resize again, so the job is written from the model inputs directly.
        encrypt_job(_Preprocessed(client), [inputs[i] for i in repeat], work / "job", images_per_batch=per_batch)
        encrypt_s = time.perf_counter() - start
        print(f"{total} images in {args.batches} batches encrypted in {encrypt_s:.1f} s", flush=True)
        rows, base = [], None
        for runner in args.runners:
            shutil.rmtree(work / "job" / "results", ignore_errors=True)
            options = {"ray_address": "local"} if runner == "ray" else {"workers": int(runner)}
            summary = run_job(work / "plan", work / "keys" / "evaluation.keys", work / "job", **options)
            logits = np.array([r["logits"] for r in decrypt_job(client, work / "job")])[: len(inputs)]
            wall = summary["wall_seconds"]
            base = base or wall
            rows.append({"runner": "Ray tasks (local cluster)" if runner == "ray" else f"{runner} process(es)",
                         "batches": args.batches, "images": total, "wall_s": wall,
                         "batch_s_mean": float(np.mean([t["seconds"] for t in summary["tasks"]])),
                         "ms_per_image": 1000 * wall / total, "speedup": base / wall,
                         "worker_processes": len({(t["host"], t["pid"]) for t in summary["tasks"]}),
                         "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
                         "accuracy": float((logits.argmax(1) == labels).mean()),
                         "max_logit_error": float(np.abs(logits - reference).max())})
            print(f"{rows[-1]['runner']}: {wall:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, [("runner", "runner", ""), ("batches", "batches", "d"), ("wall_s", "wall s", ".1f"),
                       ("batch_s_mean", "s per batch", ".1f"), ("ms_per_image", "ms / image", ".2f"),
                       ("speedup", "speedup", ".2f"), ("worker_processes", "processes", "d"),
                       ("agreement", "agreement", ".3f"), ("max_logit_error", "max err", ".1e")])
    write_json("batch_job.json", {"machine": machine(), "dataset": args.dataset, "source": source,
                                  "distinct_images": len(inputs), "encrypt_s": encrypt_s,
                                  "params": plan.params.to_dict(), "rows": rows}, args.out)
    return 0


class _Preprocessed:
    """A client whose `preprocess` takes model inputs as they are (already cropped, resized and
    normalized by the model's own recipe)."""

    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def preprocess(self, model_input):
        return np.asarray(model_input, dtype=np.float64)


if __name__ == "__main__":
    raise SystemExit(main())
