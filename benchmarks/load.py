"""Load on a real `medhe serve` process over loopback: C concurrent requests from K clinics (real
128-bit keys) for a bounded number of encrypted diagnoses, while a probe polls /health every 50 ms.

For each configuration (worker processes of one server, or Ray replicas): throughput, p50/p95
request latency, errors, 5xx, /health p99 and the peak resident memory of the server and its
workers. Targets (issue 7): zero errors, no 5xx, /health
p99 < 100 ms under load, throughput with 2 workers >= 1.7x one worker on a 2-core machine.

    .venv/bin/python benchmarks/load.py --model br35h --configs workers=1 workers=2 ray=2 --requests 24
    .venv/bin/python benchmarks/load.py --configs workers=2 --clinics 8 --key-cache 2   # memory bound
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, print_table, write_json  # noqa: E402
from tests.service_process import ServerProcess  # noqa: E402


def peak_rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def run_load(server: ServerProcess, model: str, messages: list[tuple], clients: int, requests: int) -> dict:
    """`requests` diagnoses, `clients` at a time, cycling over the (clinic, ciphertext) pairs."""
    from medhe.protocol.remote import OCTET

    latencies, statuses, health, evaluate = [], [], [], []
    stop = threading.Event()

    def probe():
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                start = time.perf_counter()
                http.get(f"{server.url}/health")
                health.append(time.perf_counter() - start)
                time.sleep(0.05)

    def one(i: int):
        remote, message = messages[i % len(messages)]
        with httpx.Client(timeout=900) as http:
            start = time.perf_counter()
            response = http.post(f"{server.url}/v1/diagnose", content=message, headers={"content-type": OCTET})
            latency = time.perf_counter() - start
        if response.status_code == 200:
            remote.client(model).decrypt_logits(response.content)  # a malformed answer fails here
            evaluate.append(float(response.headers["x-evaluate-s"]))
        return latency, response.status_code

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for latency, status in pool.map(one, range(requests)):
            latencies.append(latency)
            statuses.append(status)
    wall_s = time.perf_counter() - start
    stop.set()
    prober.join()
    ok = [lat for lat, status in zip(latencies, statuses) if status == 200]
    return {"requests": requests, "clients": clients, "wall_s": wall_s, "throughput_rps": len(ok) / wall_s,
            "latency_p50_s": float(np.percentile(ok, 50)) if ok else None,
            "latency_p95_s": float(np.percentile(ok, 95)) if ok else None,
            # the evaluation alone, as the worker measured it: shows contention between workers
            "evaluate_p50_s": float(np.median(evaluate)) if evaluate else None,
            "errors": sum(status != 200 for status in statuses), "5xx": sum(status >= 500 for status in statuses),
            "health_p99_ms": float(np.percentile(health, 99) * 1000), "health_max_ms": float(max(health) * 1000),
            "health_probes": len(health)}


def start_ray_cluster(cpus: int) -> tuple[str, callable]:
    """A local Ray cluster (as `ray start` would run on each node) -> (address, stop)."""
    import subprocess

    from tests.service_process import free_port

    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    temp_dir = f"/tmp/medhe-ray-{port}"
    subprocess.run([ray, "start", "--head", "--num-cpus", str(cpus), "--port", str(port), "--include-dashboard=false",
                    "--disable-usage-stats", "--temp-dir", temp_dir], check=True, capture_output=True)
    return f"127.0.0.1:{port}", lambda: subprocess.run([ray, "stop", "--force"], capture_output=True)


def main() -> None:
    import argparse
    import os

    from benchmarks.common import eval_images
    from medhe.nn.io import load_model, resolve_model_dir
    from medhe.protocol.remote import RemoteClient

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="br35h")
    parser.add_argument("--configs", nargs="+", default=["workers=1", "workers=2", "ray=2"],
                        help="workers=N: one server with N worker processes; ray=N: N Ray replicas of 1 worker")
    parser.add_argument("--clients", type=int, default=4, help="concurrent requests")
    parser.add_argument("--clinics", type=int, default=1, help="distinct clinics (key sets) the requests cycle over")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--key-cache", type=int, default=4, help="key sets each worker keeps in memory")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    _, card = load_model(resolve_model_dir(args.model))
    images, _, _ = eval_images(args.model, card.preprocessing)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medhe-load-") as tmp:
        tmp = Path(tmp)
        for config in args.configs:
            kind, _, count = config.partition("=")
            stop_ray = None
            common = ["--model", args.model, "--no-auth", "--key-cache", str(args.key_cache),
                      "--queue", str(args.requests)]
            if kind == "ray":
                address, stop_ray = start_ray_cluster(os.cpu_count() or 1)
                server = ServerProcess(tmp / f"srv-{kind}{count}", *common, "--ray", address, "--replicas", count)
            else:
                server = ServerProcess(tmp / f"srv-{kind}{count}", *common, "--workers", count)
            try:
                server.start(timeout_s=900)
                start = time.perf_counter()
                # Keys made once per clinic (reused across configurations), uploaded to each server.
                remotes = [RemoteClient(server.url, key_home=tmp / f"clinic{i}") for i in range(args.clinics)]
                messages = [(remote, remote.client(args.model).encrypt_image(images[i % len(images)]))
                            for i, remote in enumerate(remotes)]
                setup_s = time.perf_counter() - start
                # Warm-up, not measured: workers load the clinics' keys.
                run_load(server, args.model, messages, int(count), 2 * int(count) * args.clinics)
                row = {"config": config, "clinics": args.clinics, "setup_s": setup_s,
                       **run_load(server, args.model, messages, args.clients, args.requests)}
                row["peak_rss_gb"] = peak_rss_bytes([server.process.pid, *server.workers()]) / 2**30
                if kind == "ray":
                    row["peak_rss_gb"] = None  # replicas run under Ray, not as children of the server process
                rows.append(row)
                print(f"{config}: {row['throughput_rps']:.2f} req/s, p50 {row['latency_p50_s']:.2f} s, "
                      f"/health p99 {row['health_p99_ms']:.1f} ms, errors {row['errors']}", flush=True)
            finally:
                server.kill()
                if stop_ray:
                    stop_ray()
    base = rows[0]["throughput_rps"]
    for row in rows:
        row["speedup_vs_first"] = row["throughput_rps"] / base
    print_table(rows, [("config", "config", ""), ("clinics", "clinics", ""), ("clients", "clients", ""),
                       ("requests", "requests", ""), ("throughput_rps", "req/s", ".2f"),
                       ("speedup_vs_first", "speedup", ".2f"), ("latency_p50_s", "p50 s", ".2f"),
                       ("latency_p95_s", "p95 s", ".2f"), ("evaluate_p50_s", "eval p50 s", ".2f"),
                       ("errors", "errors", ""), ("5xx", "5xx", ""),
                       ("health_p99_ms", "health p99 ms", ".1f"), ("peak_rss_gb", "peak GB", ".2f")])
    write_json("load.json", {"model": args.model, "key_cache": args.key_cache, "machine": machine(), "rows": rows},
               args.out)


if __name__ == "__main__":
    main()
