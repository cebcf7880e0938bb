"""Throughput-mode batch jobs as files (see medhe.protocol.batch_job):

  model owner: medhe compile --model br35h --throughput --out bplan/
  clinic:      medhe keygen --spec bplan/ --out keys/
               medhe batch encrypt studies/ --spec bplan/ --keys keys/ --out job/   (index: job.index.json)
  server:      medhe batch run --plan bplan/ --keys keys/evaluation.keys --job job/ [--workers N | --ray ADDRESS]
  clinic:      medhe batch decrypt --spec bplan/ --keys keys/ --job job/ [--csv diagnoses.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from medhe.cli.he_cmd import _client, _existing, _image_files, _output_file, add_backend_argument
from medhe.errors import ConfigError


def _batch_spec(args):
    """The clinic's throughput-mode client spec: a spec file, or a shipped model compiled here."""
    from medhe.nn.modeldir import SHIPPED_MODELS
    from medhe.plan import ClientSpec

    if args.spec:
        spec = ClientSpec.load(_existing(args.spec, "client spec"))
    elif args.model in SHIPPED_MODELS:
        from medhe.compiler.batch import compile_batch
        from medhe.nn.modeldir import resolve_model_dir

        spec = compile_batch(resolve_model_dir(args.model)).client_spec()
    else:
        single = [name for name in SHIPPED_MODELS if not name.endswith("-ensemble")]  # ensembles: latency mode
        raise ConfigError(f"give --spec (from `medhe compile --throughput`) or --model with a shipped model name "
                          f"({', '.join(single)})")
    if spec.mode != "throughput":
        raise ConfigError("this client spec is for latency mode; compile with `medhe compile --throughput`")
    return spec


def _progress(total: int | None, what: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="batch", leave=False, disable=None)  # None: off when not a terminal


def cmd_batch_encrypt(args) -> int:
    from medhe.protocol.batch_job import default_index_path, encrypt_job

    spec = _batch_spec(args)
    client = _client(args, spec)
    images = _image_files(args.images)
    bar = _progress(None, "encrypting")

    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    start = time.perf_counter()
    try:
        manifest = encrypt_job(client, images, args.out, images_per_batch=args.images_per_batch,
                               workers=args.workers, index_path=args.index, on_batch=advance)
    finally:
        bar.close()
    size = sum(p.stat().st_size for p in Path(args.out).glob("batch-*.ct"))
    count = len(manifest["batches"])
    print(f"{manifest['images']} images in {count} batch{'es' if count != 1 else ''} -> {args.out} "
          f"({size / 2**20:.0f} MiB, key id {client.key_id[:16]}) in {time.perf_counter() - start:.1f} s; "
          f"image index {args.index or default_index_path(args.out)} (keep it: it names the files)")
    atypical = [str(image) for image, flag in zip(images, manifest["input_typical"]) if flag is False]
    if atypical:
        print(f"warning: {len(atypical)} of {len(images)} images are unlike the model's training images (first: "
              f"{atypical[0]}); check modality, orientation and inversion: their diagnoses may not hold "
              f"(input_typical in the decrypted rows)", file=sys.stderr)
    return 0


def cmd_batch_run(args) -> int:
    from medhe.protocol.batch_job import run_job

    if not args.plan:
        raise ConfigError("give --plan: a throughput plan directory from `medhe compile --throughput`")
    _existing(args.job, "job directory")
    bar = _progress(None, "evaluating")

    def advance(row: dict, done: int, of: int) -> None:
        bar.total = of  # the batches still without a result
        bar.update(1)

    try:
        summary = run_job(args.plan, args.keys, args.job, backend=args.backend, workers=args.workers,
                          ray_address=args.ray, on_batch=advance)
    finally:
        bar.close()
    seconds = [t["seconds"] for t in summary["tasks"]]
    where = sorted({f"{t['host']}:{t['pid']}" for t in summary["tasks"]})
    print(f"{summary['evaluated']} of {summary['batches']} batches evaluated ({summary['runner']}, "
          f"{len(where)} worker process(es)) in {summary['wall_seconds']:.1f} s"
          + (f"; {sum(seconds) / len(seconds):.1f} s per batch" if seconds else "")
          + (f"; {len(summary['skipped_with_result'])} already had a result" if summary["skipped_with_result"] else ""))
    return 0


def cmd_batch_decrypt(args) -> int:
    from medhe.data.input_check import typical_cell
    from medhe.protocol.batch_job import decrypt_job, default_index_path

    spec = _batch_spec(args)
    client = _client(args, spec)
    rows = decrypt_job(client, _existing(args.job, "job directory"), index_path=args.index)
    if args.index is None and not (index := default_index_path(args.job)).is_file():
        print(f"warning: no image index at {index}: the diagnoses are named by batch and "
              "position (batch-0000#21), not by file; pass --index JOB.index.json from `medhe batch encrypt`",
              file=sys.stderr)
    if args.csv:
        out = _output_file(args.csv)
        with out.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label"] + [f"p_{name}" for name in spec.class_names] + ["input_typical"])
            for row in rows:
                writer.writerow([row["image"], row["label"]] + [f"{p:.6f}" for p in row["probabilities"].values()]
                                + [typical_cell(row["input_typical"])])
        counts = {name: sum(r["label"] == name for r in rows) for name in spec.class_names}
        print(f"{len(rows)} diagnoses -> {out} ({', '.join(f'{n}: {c}' for n, c in counts.items())})")
    else:
        for row in rows:
            print(json.dumps({"image": row["image"], "label": row["label"],
                              "probabilities": {k: round(v, 6) for k, v in row["probabilities"].items()},
                              "input_typical": row["input_typical"]}))
    return 0


def _spec_arguments(p) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--spec", help="throughput-mode client spec (file or directory, from `medhe compile "
                                      "--throughput`)")
    group.add_argument("--model", help="shipped model name; its throughput-mode spec is compiled here")
    p.add_argument("--keys", required=True, help="key directory from `medhe keygen` (or its secret.key)")
    add_backend_argument(p)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("batch", help="throughput-mode batch jobs as files (screening): encrypt, run "
                                            "(here, in local processes or on Ray), decrypt")
    sub = p.add_subparsers(dest="batch_command", metavar="STEP", required=True)

    e = sub.add_parser("encrypt", help="clinic: encrypt images (folders expanded) into a new job directory")
    e.add_argument("images", nargs="+", help="PNG/JPEG/DICOM files or folders")
    _spec_arguments(e)
    e.add_argument("--out", required=True, help="new job directory (what the server gets)")
    e.add_argument("--index", help="where to write the image index, which names the files and stays with the "
                                   "clinic (default: OUT.index.json beside the job)")
    e.add_argument("--images-per-batch", type=_positive_int, default=None,
                   help="at most this many images per batch message (default and maximum: N/2 slots)")
    e.add_argument("--workers", type=_positive_int, default=1,
                   help="1 (default): encrypt in this process with the secret key, seeded (half the bytes); N > 1: "
                        "N helper processes encrypting under the public key (faster on many cores, twice the bytes)")
    e.set_defaults(func=cmd_batch_encrypt)

    r = sub.add_parser("run", help="server: evaluate every batch of a job that has no result yet")
    r.add_argument("--plan", required=True, help="throughput plan directory (from `medhe compile --throughput`)")
    r.add_argument("--keys", required=True, help="the clinic's evaluation.keys file (public material)")
    r.add_argument("--job", required=True, help="job directory from `medhe batch encrypt`; results go to JOB/results/")
    where = r.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive_int, default=1, help="local worker processes, one batch each (default 1)")
    where.add_argument("--ray", metavar="ADDRESS", help="run each batch as a Ray task on this cluster ('auto' to "
                                                       "join the local node's cluster, 'local' to start one); "
                                                       "the plan, keys and job must be at the same path on every "
                                                       "node (shared file system)")
    add_backend_argument(r)
    r.set_defaults(func=cmd_batch_run)

    d = sub.add_parser("decrypt", help="clinic: decrypt a job's results (one line per image, or --csv)")
    _spec_arguments(d)
    d.add_argument("--job", required=True, help="job directory with its results/ from `medhe batch run`")
    d.add_argument("--index", help="the image index written by `medhe batch encrypt` (default: JOB.index.json)")
    d.add_argument("--csv", help="write image, label and probabilities to this CSV file")
    d.set_defaults(func=cmd_batch_decrypt)
