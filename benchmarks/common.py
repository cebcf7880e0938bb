"""Shared bits of the benchmark scripts: held-out data of each dataset, table printing, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from medhe.train.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()  # before a script imports torch, so its trainings give `medhe train`'s bits
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def eval_images(dataset: str, preprocessing, data_file: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Held-out grayscale images in [0,1] (n, S, S), cropped and resized by a model's Preprocessing,
    and labels: Br35H grouped test split, PneumoniaMNIST val (its test split is withheld from us)."""
    if dataset == "br35h":
        from medhe.data.br35h import load_br35h

        images, labels = load_br35h("test", **preprocessing.geometry())
        return images, labels, "br35h-v1 test (grouped, leakage-free)"
    from medhe.data.medmnist import default_pneumoniamnist_path, load_medmnist_npz

    path = data_file or default_pneumoniamnist_path()
    if path is None:
        raise SystemExit("PneumoniaMNIST npz not found: pass --data-file PATH.npz")
    images, labels = load_medmnist_npz(path, "val")
    gray = images.astype(np.float32) / 255.0
    if gray.shape[1] != preprocessing.image_size:
        gray = np.stack([preprocessing.resize(g) for g in gray])
    return gray, labels, f"{Path(path).name} val"


def held_out_inputs(dataset: str, limit: int, data_file: str | None = None, *, spread: bool = False):
    """(model inputs, labels, plaintext logits, source) for `limit` held-out images of a shipped
    model: the first ones, or with `spread` a deterministic spread over the whole split."""
    import torch

    from medhe.nn.io import load_model, resolve_model_dir

    model, card = load_model(resolve_model_dir(dataset))
    images, labels, source = eval_images(dataset, card.preprocessing, data_file)
    pick = np.linspace(0, len(images) - 1, limit).round().astype(int) if spread else np.arange(min(limit, len(images)))
    inputs = card.preprocessing.apply_batch(images[pick])
    with torch.no_grad():
        reference = model(torch.tensor(inputs)).double().numpy()
    return inputs, np.asarray(labels)[pick], reference, source


def seal_evaluation(name: str, *, max_galois_keys: int | None = None):
    """A shipped model compiled (128-bit), a client backend with its keys, the server side built
    from the public keys, a prepared executor, its encoded-weights cache (share it with other
    executors of the same plan) and a packer: (plan, client_backend, server_backend, executor,
    cache, packer)."""
    from medhe.compiler import compile_model
    from medhe.nn.io import resolve_model_dir
    from medhe.protocol.client import Client
    from medhe.runtime.executor import Executor
    from medhe.runtime.seal_backend import SEALClientBackend, SEALServerBackend

    plan = compile_model(resolve_model_dir(name), max_galois_keys=max_galois_keys)
    client_backend = SEALClientBackend(plan.params)
    relin, galois = client_backend.evaluation_keys(plan.galois_steps())
    server_backend = SEALServerBackend(plan.params, relin, galois or None)
    cache: dict = {}
    executor = Executor(plan, server_backend, cache=cache)
    executor.prepare()
    packer = Client(plan.client_spec(), backend="clear")  # packing only: no key of its own is used
    return plan, client_backend, server_backend, executor, cache, packer


def benchmark_parser(doc: str):
    """The options every per-model benchmark takes: datasets, image count, data file, output."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["br35h", "pneumoniamnist"])
    parser.add_argument("--limit", type=int, default=20, help="encrypted images per dataset")
    parser.add_argument("--data-file", default=None, help="PneumoniaMNIST npz (default: ../shared copy)")
    parser.add_argument("--out", default=None)
    return parser


def peak_memory_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the address space, so a process
    spawned by another starts from zero (ru_maxrss would carry the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key, "")
        if value is None:
            return "-"
        return format(value, fmt) if isinstance(value, (int, float)) and fmt else str(value)

    widths = [max([len(h), 10] + [len(cell(row, key, fmt)) for row in rows]) for key, h, fmt in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell(row, key, fmt).rjust(w) for (key, _, fmt), w in zip(columns, widths)))


def write_json(name: str, payload: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {path}")
    return path
