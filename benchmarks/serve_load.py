"""Load test of `locllm serve`: the service on loopback, C concurrent clients, a bounded number
of requests, with and without request batching, side by side in one run.

    python benchmarks/serve_load.py [--clients 1,4,16] [--requests 48] [--model demo] [--out results.json]

Each client sends POST /v1/locate (the bundled astronaut photo, one person box, --keypoints)
until the run's --requests are spent, then the run stops by itself. Reported per (batching,
clients): throughput (requests/s), p50/p90/p99 latency (ms), errors (non-200 answers, 503s
counted apart). Ray runs embedded and is shut down at the end.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tests" / "data" / "astronaut.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, body: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    req = urllib.request.Request(url + "/v1/locate", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    return 1000.0 * (time.perf_counter() - start), code


def load(url: str, body: bytes, clients: int, requests: int) -> dict:
    """``clients`` concurrent clients until ``requests`` are sent."""
    budget = itertools.count()
    results: list[tuple[float, int]] = []

    def client() -> None:
        while next(budget) < requests:
            results.append(one_request(url, body))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    ok = np.array([ms for ms, code in results if code == 200])
    p50, p90, p99 = (float(np.percentile(ok, q)) for q in (50, 90, 99)) if ok.size else (float("nan"),) * 3
    return {
        "clients": clients,
        "requests": len(results),
        "throughput_rps": len(ok) / wall,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "errors": sum(code != 200 for _, code in results),
        "rejected_503": sum(code == 503 for _, code in results),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="engine directory or demo")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=48, help="requests per (batching, clients) cell")
    ap.add_argument("--keypoints", default="neck,pelvis")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the replica")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, help="write the table as JSON")
    args = ap.parse_args(argv)
    import ray
    from locllm_sdk import serve
    from locllm_sdk.demo import engine_for, resolve_model
    from ray import serve as ray_serve

    engine = str(engine_for(resolve_model(args.model)))
    clients = [int(c) for c in args.clients.split(",")]
    body = json.dumps(
        {
            "image": base64.b64encode(IMAGE.read_bytes()).decode(),
            "keypoints": args.keypoints.split(","),
            "boxes": [[100, 20, 200, 300]],
        }
    ).encode()
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        port = free_port()
        for batching in (True, False):
            app = serve.service(
                engine, threads=args.threads, batching=batching, max_batch_size=args.max_batch_size,
                max_ongoing_requests=64, max_queued_requests=256,
            )  # fmt: skip
            url = serve.start(app, port=port)
            one_request(url, body)  # warm-up: the replica's first pass
            for c in clients:
                row = {"batching": batching, **load(url, body, c, args.requests)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            ray_serve.delete("locllm")
    finally:
        serve.stop()
    print(f"{'batching':>9} {'clients':>8} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in rows:
        print(
            f"{'on' if r['batching'] else 'off':>9} {r['clients']:>8} {r['throughput_rps']:>7.2f} {r['p50_ms']:>8.0f} "
            f"{r['p90_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['errors']:>7}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
