"""Load on a real `medhe serve` process over loopback: C concurrent clinics send a bounded number of
encrypted diagnoses (real 128-bit keys) while a probe polls /health every 50 ms.

For each worker count: throughput, p50/p95 request latency, errors, 5xx, /health p99 and the peak
resident memory of the server and its workers. Targets (issue 7): zero errors, no 5xx, /health
p99 < 100 ms under load, throughput with 2 workers >= 1.7x one worker on a 2-core machine.

    .venv/bin/python benchmarks/load.py --model br35h --workers 1 2 --clients 4 --requests 24
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


def run_load(server: ServerProcess, remote, model: str, messages: list[bytes], clients: int, requests: int) -> dict:
    from medhe.protocol.remote import OCTET

    latencies, statuses, health = [], [], []
    stop = threading.Event()

    def probe():
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                start = time.perf_counter()
                http.get(f"{server.url}/health")
                health.append(time.perf_counter() - start)
                time.sleep(0.05)

    client = remote.client(model)

    def one(i: int):
        message = messages[i % len(messages)]
        with httpx.Client(timeout=900) as http:
            start = time.perf_counter()
            response = http.post(f"{server.url}/v1/diagnose", content=message, headers={"content-type": OCTET})
            latency = time.perf_counter() - start
        ok = response.status_code == 200
        if ok:
            client.decrypt_logits(response.content)  # a wrong answer would fail here or in the label check
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
            "errors": sum(status != 200 for status in statuses), "5xx": sum(status >= 500 for status in statuses),
            "health_p99_ms": float(np.percentile(health, 99) * 1000), "health_max_ms": float(max(health) * 1000),
            "health_probes": len(health)}


def main() -> None:
    import argparse

    from medhe.protocol.remote import RemoteClient
    from medhe.nn.io import load_model, resolve_model_dir
    from benchmarks.common import eval_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="br35h")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--key-cache", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    _, card = load_model(resolve_model_dir(args.model))
    images, _, _ = eval_images(args.model, card.arch.image_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medhe-load-") as tmp:
        tmp = Path(tmp)
        for workers in args.workers:
            server = ServerProcess(tmp / f"srv{workers}", "--model", args.model, "--workers", str(workers),
                                   "--no-auth", "--key-cache", str(args.key_cache), "--queue", str(args.requests))
            try:
                server.start(timeout_s=900)
                remote = RemoteClient(server.url, key_home=tmp / "clinic")  # keys made once, uploaded per server
                start = time.perf_counter()
                client = remote.client(args.model)
                setup_s = time.perf_counter() - start
                messages = [client.encrypt_image(images[i]) for i in range(8)]
                # Warm-up, not measured: every worker loads the clinic's keys once.
                run_load(server, remote, args.model, messages, workers, 2 * workers)
                row = {"workers": workers, "setup_s": setup_s,
                       **run_load(server, remote, args.model, messages, args.clients, args.requests)}
                row["peak_rss_gb"] = peak_rss_bytes([server.process.pid, *server.workers()]) / 2**30
                rows.append(row)
                print(f"workers={workers}: {row['throughput_rps']:.2f} req/s, p50 {row['latency_p50_s']:.2f} s, "
                      f"/health p99 {row['health_p99_ms']:.1f} ms", flush=True)
            finally:
                server.kill()
    base = rows[0]["throughput_rps"]
    for row in rows:
        row["speedup_vs_first"] = row["throughput_rps"] / base
    print_table(rows, [("workers", "workers", ""), ("clients", "clients", ""), ("requests", "requests", ""),
                       ("throughput_rps", "req/s", ".2f"), ("speedup_vs_first", "speedup", ".2f"),
                       ("latency_p50_s", "p50 s", ".2f"), ("latency_p95_s", "p95 s", ".2f"),
                       ("errors", "errors", ""), ("5xx", "5xx", ""), ("health_p99_ms", "health p99 ms", ".1f"),
                       ("peak_rss_gb", "peak GB", ".2f")])
    write_json("load.json", {"model": args.model, "machine": machine(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
