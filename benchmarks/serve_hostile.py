"""The OpenAI-compatible server against hostile clients: what each costs the server, and whether valid clients
are still answered afterwards.

Starts `python -m vopd_bench.serve MODEL --api-key-env K` (default flags otherwise) on a free loopback port, then,
in order:

  question     a valid request whose question is N characters long (default 200,000 and 2,000,000): status and
               seconds to the answer;
  bomb         a PNG whose header declares 20,000 x 20,000 pixels (400 MP, over the 100 MP limit);
  keyless 8GB  no key, `Content-Length: 8000000000`: status and seconds from the headers; then how many bytes the
               client managed to push before the server's close stopped it;
  slow loris   a client that sends one header byte every 0.5 s for 40 s (past the 30 s read timeout), while a
               valid request is timed;
  32 at once   32 valid requests sent together: how many were answered 200, and the wall time;

and prints the server's RSS after start-up and its peak RSS (VmHWM) at the end. Linux only (/proc).

    .venv/bin/python benchmarks/serve_hostile.py [--model toy] [--chars 200000,2000000] [--no-slow-loris]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

from PIL import Image

KEY = "sk-bench-hostile"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _body(model: str, question: str, png: bytes) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return json.dumps({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}).encode()


def _post(port: int, body: bytes, timeout: float = 300) -> tuple[int, str, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        r = conn.getresponse()
        data = json.loads(r.read() or b"{}")
    except OSError as e:
        return 0, f"{type(e).__name__}", time.monotonic() - t0
    finally:
        conn.close()
    text = data["error"]["message"] if "error" in data else data["choices"][0]["message"]["content"]
    return r.status, text[:90], time.monotonic() - t0


def _rss_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--chars", default="200000,2000000", help="comma-separated question lengths")
    ap.add_argument("--no-slow-loris", action="store_true", help="skip the 40 s slow client")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "vopd_bench.serve", args.model, "--api-key-env", "K", "--port",
                               str(port)], env={**os.environ, "K": KEY}, stdout=subprocess.PIPE, text=True)
    try:
        print(server.stdout.readline().strip())
        print(f"load average {os.getloadavg()[0]:.1f}; server RSS after start-up {_rss_mb(server.pid, 'VmRSS'):.0f} MB")
        png = _png()
        for n in (int(c) for c in args.chars.split(",")):
            question = ("What colour is the image? " + "lorem ipsum " * (n // 12 + 1))[:n]
            status, text, seconds = _post(port, _body(args.model, question, png))
            print(f"question of {n:,} characters: {status} in {seconds:.3f} s ({text})")
        status, text, seconds = _post(port, _body(args.model, "What colour?", _bomb()))
        print(f"20,000 x 20,000 PNG header: {status} in {seconds:.3f} s ({text})")

        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 8000000000\r\n\r\n")
            t0 = time.monotonic()
            status_line = s.makefile("rb").readline().decode().strip()
            seconds = time.monotonic() - t0
            pushed, chunk = 0, b"x" * 2**20
            try:
                while pushed < 8 * 2**30:
                    s.sendall(chunk)
                    pushed += len(chunk)
                stopped = "never stopped"
            except OSError as e:
                stopped = f"then {type(e).__name__}"
            print(f"keyless 8 GB body: '{status_line}' after {seconds * 1000:.1f} ms, from the headers alone; the "
                  f"client pushed {pushed / 2**20:.0f} MB into the socket buffers, {stopped}")

        if not args.no_slow_loris:
            loris = socket.create_connection(("127.0.0.1", port), timeout=60)
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n"
            result: list[str] = []

            def drip() -> None:
                t0 = time.monotonic()
                try:
                    for byte in head:
                        loris.sendall(bytes([byte]))
                        time.sleep(0.5)
                        if time.monotonic() - t0 > 40:
                            break
                except OSError:
                    pass
                try:
                    result.append(f"{loris.makefile('rb').readline().decode().strip()!r} after "
                                  f"{time.monotonic() - t0:.1f} s")
                except OSError as e:
                    result.append(f"{type(e).__name__} after {time.monotonic() - t0:.1f} s")

            dripper = threading.Thread(target=drip)
            dripper.start()
            time.sleep(2)
            status, _, seconds = _post(port, _body(args.model, "What colour?", png))
            print(f"valid request while a slow client drips its headers: {status} in {seconds:.3f} s")
            dripper.join()
            loris.close()
            print(f"slow client (a header byte every 0.5 s): {result[0]}")

        results: list = [None] * 32
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, _post(port, _body(args.model, "What colour is the image?", png)))) for i in range(32)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = sum(r[0] == 200 for r in results)
        print(f"32 valid requests at once: {ok}/32 answered 200 in {time.monotonic() - t0:.2f} s")
        print(f"server peak RSS (VmHWM) {_rss_mb(server.pid, 'VmHWM'):.0f} MB")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
