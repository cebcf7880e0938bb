#!/usr/bin/env python
"""Side-by-side: the TenSEAL tutorial's encrypted CNN vs. medhe, same images, same run.

    python benchmarks/compare_tenseal.py --dataset pneumoniamnist [--data-file PATH.npz]
        [--limit 50] [--out benchmarks/results/compare_pneumoniamnist.json]
    python benchmarks/compare_tenseal.py --dataset br35h [--limit 50]

PneumoniaMNIST: train on `train`, evaluate on `val` (its test split is withheld), 28x28.
Br35H: train on `train`, evaluate on `test`, 32x32.

Both systems get the same eval images; plaintext accuracy is over all of them, encrypted
accuracy / agreement / latencies over the first --limit. The medhe side is
`medhe.bench.OursRun(dataset, eval_gray01_images, eval_labels, limit)`; when it cannot be
imported or fails, the baseline is still reported and written. The two systems take turns image
by image (after each baseline image, medhe's same image; `--sequential`: all of one, then all of
the other), so a drift of this machine's speed falls on both alike. `--medhe-processes 1 2` measures
medhe twice: in one process, and with each evaluation shared with a helper process (the
baseline's thread pool uses both cores too).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _p in (str(BENCH_DIR), str(REPO_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import tenseal_baseline as tb  # noqa: E402  (benchmarks/ is not a package)

DATASETS = {
    # name: (train split, eval split, image size)
    "pneumoniamnist": ("train", "val", 28),
    "br35h": ("train", "test", 32),
}

# (column title, result key, formatter)
COLUMNS = (
    ("plain acc", "plaintext_accuracy", "pct"),
    ("enc acc", "encrypted_accuracy", "pct"),
    ("agree", "agreement", "pct"),
    ("server s (med)", "server_latency_median_s", "sec"),
    ("enc s", "client_encrypt_median_s", "sec"),
    ("dec s", "client_decrypt_median_s", "sec"),
    ("upload", "upload_bytes", "bytes"),
    ("eval keys", "eval_key_bytes", "bytes"),
)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100.0 * float(value):.1f}%"
    if kind == "sec":
        value = float(value)
        return f"{value:.3f}" if value >= 0.1 else f"{value:.4f}"
    if kind == "bytes":
        value = float(value)
        for unit in ("B", "KB", "MB", "GB"):
            if value < 1024 or unit == "GB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["system"] + [title for title, _, _ in COLUMNS]
    body = [
        [str(row.get("system", "?"))] + [_fmt(row.get(key), kind) for _, key, kind in COLUMNS]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [line(b) for b in body])


def load_dataset(
    dataset: str, data_file: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """-> (train gray01 (n,h,w) float32, train labels, eval gray01, eval labels, info)."""
    train_split, eval_split, image_size = DATASETS[dataset]
    info: dict[str, Any] = {
        "dataset": dataset,
        "train_split": train_split,
        "eval_split": eval_split,
        "image_size": image_size,
    }
    if dataset == "pneumoniamnist":
        from medhe.data.medmnist import default_pneumoniamnist_path, load_medmnist_npz

        path = Path(data_file) if data_file else default_pneumoniamnist_path()
        if path is None:
            raise SystemExit(
                "PneumoniaMNIST not found: pass --data-file PATH.npz or set $MEDHE_PNEUMONIAMNIST."
            )
        train_u8, train_y = load_medmnist_npz(path, train_split)
        eval_u8, eval_y = load_medmnist_npz(path, eval_split)
        info["data_file"] = str(path)
        train_gray = train_u8.astype(np.float32) / np.float32(255.0)
        eval_gray = eval_u8.astype(np.float32) / np.float32(255.0)
    elif dataset == "br35h":
        if data_file:
            raise SystemExit("--data-file is only used for pneumoniamnist; Br35H is found by its loader.")
        from medhe.data.br35h import load_br35h
        from medhe.nn.io import load_model, resolve_model_dir

        # Both networks see the images cropped and normalised as the shipped medhe model's recipe says.
        recipe = load_model(resolve_model_dir("br35h"))[1].preprocessing
        geometry = recipe.geometry()
        geometry["image_size"] = image_size
        info["crop"], info["resize_filter"] = geometry["crop"], geometry["resize_filter"]
        info["normalization"] = recipe.normalization
        train_gray, train_y = load_br35h(train_split, **geometry)
        eval_gray, eval_y = load_br35h(eval_split, **geometry)
        train_gray = np.asarray(train_gray, dtype=np.float32)
        eval_gray = np.asarray(eval_gray, dtype=np.float32)
    else:  # argparse restricts choices
        raise SystemExit(f"unknown dataset {dataset!r}")
    return (
        train_gray,
        np.asarray(train_y).reshape(-1).astype(np.int64),
        eval_gray,
        np.asarray(eval_y).reshape(-1).astype(np.int64),
        info,
    )


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _environment() -> dict[str, Any]:
    import tenseal
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "tenseal": tenseal.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        # Other jobs on the machine inflate latencies; compare the load at start and end.
        "load_average_end_1_5_15min": _load_average(),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST .npz (default: the shared copy)")
    parser.add_argument("--limit", type=int, default=50, help="images evaluated encrypted (default 50)")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/compare_<dataset>.json)")
    parser.add_argument("--epochs", type=int, default=10, help="TutorialNet training epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline-image-size",
        type=int,
        default=None,
        help=(
            "side the baseline's input is resized to (default: the dataset's size). 32x32 does "
            "not fit the tutorial's N=8192 and runs at N=16384; pass 28 to keep N=8192 on Br35H."
        ),
    )
    parser.add_argument("--skip-ours", action="store_true", help="run the baseline only")
    parser.add_argument(
        "--medhe-processes", type=int, nargs="+", choices=(1, 2), default=[1],
        help="medhe rows to measure: 1 = one process per evaluation, 2 = each evaluation shared with a "
             "helper process (both cores, as the baseline's thread pool uses); default 1",
    )
    parser.add_argument(
        "--sequential", action="store_true",
        help="evaluate all baseline images, then all medhe images (default: take turns image by image, "
             "so a drift of the machine's speed falls on both systems alike)",
    )
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from medhe.data.preprocess import fit_preprocessing

    out_path = Path(args.out) if args.out else BENCH_DIR / "results" / f"compare_{args.dataset}.json"
    load_at_start = _load_average()
    train_gray, train_y, eval_gray, eval_y, info = load_dataset(args.dataset, args.data_file)
    limit = min(args.limit, len(eval_y))
    print(
        f"{args.dataset}: {len(train_y)} train ({info['train_split']}), {len(eval_y)} eval "
        f"({info['eval_split']}), encrypted on the first {limit}",
        flush=True,
    )

    # ---- ours: medhe, set up first so that its images can alternate with the baseline's -------
    ours_runs: list[Any] = []
    ours_rows: list[dict[str, Any]] = []
    ours_error: str | None = None
    exit_code = 0
    if args.skip_ours:
        ours_error = "skipped (--skip-ours)"
    else:
        try:
            from medhe.bench import OursRun
        except Exception as exc:  # broken import: the baseline is still reported
            ours_error = f"{type(exc).__name__}: {exc}"
            print(f"medhe side unavailable: {ours_error}", flush=True)
        else:
            for processes in args.medhe_processes:
                try:
                    ours_runs.append(OursRun(args.dataset, eval_gray, eval_y, limit, two_processes=processes == 2))
                except Exception as exc:
                    ours_error = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    print(f"medhe side unavailable: {ours_error}", flush=True)
                    exit_code = 1

    started_runs = list(ours_runs)  # a run that fails is dropped from ours_runs, not from the timing

    def ours_image(index: int) -> None:
        nonlocal ours_error, exit_code
        for run in list(ours_runs):
            try:
                run.step(index)
            except Exception as exc:  # the baseline goes on and is still reported
                ours_error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                print(f"medhe side failed: {ours_error}", flush=True)
                exit_code = 1
                ours_runs.remove(run)

    # ---- baseline: TenSEAL tutorial CNN ---------------------------------------------------
    baseline_size = args.baseline_image_size or info["image_size"]
    pre = fit_preprocessing(train_gray, baseline_size, normalization=info.get("normalization", "dataset"))
    train_x = pre.apply_batch(train_gray)
    eval_x = pre.apply_batch(eval_gray)
    interleaved = bool(ours_runs) and not args.sequential
    if interleaved:
        print("the two systems take turns image by image", flush=True)
    t0 = time.perf_counter()
    baseline = tb.run_baseline(
        train_x, train_y, eval_x, eval_y, limit=limit, epochs=args.epochs, seed=args.seed,
        after_image=ours_image if interleaved else None,
    )
    # Without medhe's turns, which ran inside that window when interleaved.
    baseline["wall_s"] = time.perf_counter() - t0 - (sum(run.seconds for run in started_runs) if interleaved else 0.0)
    baseline["preprocessing"] = pre.to_dict()
    if baseline["parameters"]["deviates_from_tutorial"]:
        print(
            f"note: baseline runs at poly_modulus_degree {baseline['parameters']['poly_modulus_degree']} "
            f"(the tutorial's 8192 has too few slots for {baseline_size}x{baseline_size} im2col)",
            flush=True,
        )
    if not interleaved:
        for index in range(limit):
            ours_image(index)
    for run in ours_runs:
        try:
            row = run.summary()
        except Exception as exc:  # the baseline is still reported
            ours_error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            exit_code = 1
            continue
        row.update({"interleaved_with_baseline": interleaved, "wall_s": run.seconds})
        ours_rows.append(row)
    # "ours" (and speed_ratio_baseline_over_ours) stay the one-process row where there is one.
    ours = next((row for row in ours_rows if row.get("processes") == 1), ours_rows[0] if ours_rows else None)

    # ---- report --------------------------------------------------------------------------
    rows = [baseline] + ours_rows

    def ratio(row: dict[str, Any]) -> float | None:
        if row.get("server_latency_median_s") and baseline.get("server_latency_median_s"):
            return float(baseline["server_latency_median_s"]) / float(row["server_latency_median_s"])
        return None

    speed_ratio = ratio(ours) if ours else None
    for row in ours_rows:
        row["speed_ratio_baseline_over_this"] = ratio(row)

    print()
    print(format_table(rows))
    print()
    print(
        f"baseline max |logit error| vs its plaintext: {_fmt(baseline['max_abs_logit_error'], 'sec')}; "
        f"CKKS N={baseline['parameters']['poly_modulus_degree']}, "
        f"q={baseline['parameters']['coeff_mod_bit_sizes']}, scale 2^{baseline['parameters']['global_scale_bits']}"
    )
    for row in ours_rows:
        if row["speed_ratio_baseline_over_this"] is not None:
            print(f"speed ratio (baseline server latency / {row['system']}): "
                  f"{row['speed_ratio_baseline_over_this']:.2f}x")
    if not any(row["speed_ratio_baseline_over_this"] is not None for row in ours_rows):
        print(f"speed ratio: n/a ({ours_error or 'ours reported no server latency'})")

    result = {
        **info,
        "baseline_image_size": baseline_size,
        "n_train": int(len(train_y)),
        "n_eval": int(len(eval_y)),
        "limit": limit,
        "interleaved": interleaved,
        "epochs": args.epochs,
        "seed": args.seed,
        "columns": {title: key for title, key, _ in COLUMNS},
        "table": [{"system": r.get("system"), **{key: r.get(key) for _, key, _ in COLUMNS}} for r in rows],
        "speed_ratio_baseline_over_ours": speed_ratio,
        "baseline": baseline,
        "ours": ours,
        "ours_rows": ours_rows,
        "ours_error": ours_error,
        "environment": {**_environment(), "load_average_start_1_5_15min": load_at_start},
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    tmp.replace(out_path)
    print(f"wrote {out_path}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
