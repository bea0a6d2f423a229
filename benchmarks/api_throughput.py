"""Throughput of the `openai` backend against the capacity of the server it talks to.

The server is `vopd_bench.serve` in its own process, in front of a stand-in engine with a fixed service time:
every request takes LATENCY seconds however many are in flight (up to far more than the client sends), which
is how an engine with continuous batching such as vLLM behaves below saturation. So the figures measure the
client and the HTTP path, not a model.

  capacity  the server's own throughput at CONCURRENCY: CONCURRENCY threads submit the same requests straight
            to its dispatcher, in process, with no HTTP (ideal: CONCURRENCY / LATENCY);
  client    `OpenAIBackend.generate` over HTTP with `concurrency=CONCURRENCY`, called batch by batch as the
            gap-report runner calls it (batches of `preferred_batch_size`), images encoded as PNG per request.

The ratio client / capacity is the figure of merit (target ≥ 0.90 at concurrency 64). Several latencies show
where the client's own CPU cost starts to limit it; the CPU time per request is printed too.

    .venv/bin/python benchmarks/api_throughput.py [--latency 0.5,0.2] [--concurrency 64] [--requests 1024]
                                                 [--image-size 448]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import threading
import time

from PIL import Image, ImageDraw


def _serve(conn, latency: float, workers: int) -> None:
    """Child process: serve a SleepBackend until told to stop."""
    from vopd_bench.serve import SleepBackend, serve_backend

    server = serve_backend(SleepBackend(latency), model_name="bench", workers=workers, max_batch=1, window_s=0.0,
                           decode_images=False)
    conn.send(server.url)
    conn.recv()  # wait for "stop"
    server.close()


def _images(n: int, side: int, kind: str) -> list[Image.Image]:
    """Distinct images. "flat": a few shapes on a plain canvas, like the synthetic benchmark (cheap to encode).
    "photo": gradients, shapes and pixel noise, which PNG compresses about as badly as a photograph."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if kind == "photo":
            y, x = np.mgrid[0:side, 0:side]
            base = np.stack([(x + 7 * i) % 256, (y * 2 + 13 * i) % 256, ((x + y) // 2) % 256], -1).astype(np.int16)
            img = Image.fromarray(np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8), "RGB")
        else:
            img = Image.new("RGB", (side, side), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            r = side // 10
            cx, cy = rng.integers(r, side - r, 2)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        out.append(img)
    return out


def capacity(latency: float, concurrency: int, workers: int, requests) -> float:
    """Requests per second when `concurrency` threads drive the server's dispatcher directly (no HTTP)."""
    from vopd_bench.backends.base import GenerationConfig
    from vopd_bench.serve import Dispatcher, SleepBackend

    dispatcher = Dispatcher(SleepBackend(latency), workers=workers, max_batch=1, window_s=0.0)
    gen = GenerationConfig(max_new_tokens=8)
    it = iter(requests)
    lock = threading.Lock()

    def drive() -> None:
        while True:
            with lock:
                req = next(it, None)
            if req is None:
                return
            dispatcher.submit(req, gen)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=drive) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    dispatcher.close()
    return len(requests) / wall


def client(url: str, concurrency: int, requests, image_format: str) -> tuple[float, float, int]:
    """(requests per second, client CPU ms per request, errors) for OpenAIBackend over HTTP, batch by batch."""
    from vopd_bench.backends.base import GenerationConfig
    from vopd_bench.backends.openai import OpenAIBackend

    backend = OpenAIBackend("bench", base_url=url, concurrency=concurrency, timeout=60, image_format=image_format)
    gen = GenerationConfig(max_new_tokens=8)
    backend.generate(requests[:concurrency], gen)  # open the connections first, as a long run would have
    size = backend.preferred_batch_size
    errors = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(requests), size):
        errors += sum(r.error is not None for r in backend.generate(requests[i:i + size], gen))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    backend.close()
    return len(requests) / wall, 1000 * cpu / len(requests), errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", default="0.5", help="comma-separated service times in seconds")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--images", default="flat,photo", help="comma-separated image kinds: flat, photo")
    ap.add_argument("--format", default="png,jpeg", help="comma-separated image encodings sent: png, jpeg")
    args = ap.parse_args()

    from vopd_bench.backends.base import Request

    workers = 4 * args.concurrency  # the engine never queues: its capacity is set by the client's concurrency
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} before the run")
    print(f"{args.requests} requests of {args.image_size}x{args.image_size} images, concurrency {args.concurrency}")
    print(f"{'latency':>8} {'images':>6} {'format':>6} {'ideal':>8} {'capacity':>9} {'client':>8} {'ratio':>6} "
          f"{'cpu/req':>8}")
    ctx = mp.get_context("spawn")
    for latency in (float(x) for x in args.latency.split(",")):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, latency, workers), daemon=True)
        proc.start()
        url = parent.recv()
        try:
            for kind in args.images.split(","):
                images = _images(16, args.image_size, kind)
                requests = [Request(str(i), images[i % len(images)], f"Question {i}: what colour is the circle?")
                            for i in range(args.requests)]
                cap = capacity(latency, args.concurrency, workers, requests)
                for fmt in args.format.split(","):
                    rate, cpu_ms, errors = client(url, args.concurrency, requests, fmt)
                    print(f"{latency:>7.3f}s {kind:>6} {fmt:>6} {args.concurrency / latency:>6.1f}/s {cap:>7.1f}/s "
                          f"{rate:>6.1f}/s {rate / cap:>6.3f} {cpu_ms:>6.2f}ms" + (f"  ({errors} errors)" if errors else ""),
                          flush=True)
        finally:
            parent.send("stop")
            proc.join(timeout=10)


if __name__ == "__main__":
    main()
