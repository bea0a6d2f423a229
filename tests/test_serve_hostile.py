"""The OpenAI-compatible server (`vopd_bench.serve`) against hostile clients, on loopback.

One test drives `python -m vopd_bench.serve toy --api-key-env K` in its own process, as the server's limits
promise it survives: a 2,000,000-character question, a keyless 8 GB body, then 32 valid requests at once, with the
server's peak RSS read from /proc. The others drive an in-process server in front of a stand-in backend whose
timing the test controls (a gate), with small limits so every bound is reached in well under a second.
"""

from __future__ import annotations

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

import pytest
from PIL import Image

from vopd_bench.serve import SleepBackend, serve_backend
from vopd_bench.serve_limits import MB, ServeLimits

KEY = "sk-test-hostile-51c0"
AUTH = f"Bearer {KEY}"


def _png(width: int = 32, height: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height; its pixel data is a few bytes (decoding would fail late)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _body(question: str = "What colour is the image?", *, model: str = "toy", png: bytes | None = None,
          **extra) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(png or _png()).decode()
    return json.dumps({"model": model, "max_tokens": 4, **extra, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}).encode()


def _head(length: int | None = None, auth: str | None = AUTH, extra: str = "") -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if auth:
        lines.append(f"Authorization: {auth}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from a raw socket: (status, headers lower-cased, body)."""
    f = sock.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline().strip()) != b"":
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get("content-length", 0)))
    return status, headers, body


def _raw(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read_response(s)


def _post(port: int, body: bytes, auth: str | None = AUTH, timeout: float = 30) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read() or b"{}")
    finally:
        conn.close()


class Gate(SleepBackend):
    """Answers only once `open` is set; records every prompt it was asked."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.model_name = "toy"
        self.open = threading.Event()
        self.asked: list[str] = []
        self.entered = threading.Semaphore(0)

    def generate(self, requests, gen):
        self.asked.extend(r.prompt for r in requests)
        self.entered.release()
        assert self.open.wait(30)
        return super().generate(requests, gen)


def _wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)


def _server(backend=None, **limits):
    return serve_backend(backend or SleepBackend(0.0), model_name="toy", api_key=KEY, max_batch=1,
                         limits=ServeLimits(**limits))


# ---------------------------------------------------------------------------------------------------------------
# the server the user starts, against the hostile clients


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
def test_the_toy_server_survives_a_huge_question_and_a_keyless_8gb_body_then_answers_32_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "K": KEY}
    server = subprocess.Popen([sys.executable, "-m", "vopd_bench.serve", "toy", "--api-key-env", "K", "--port",
                               str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving toy at"), server.stderr.read()

        # A 2,000,000-character question: refused by the prompt-length check within 2 s.
        t0 = time.monotonic()
        status, _, answer = _post(port, _body("What colour? " + "lorem ipsum " * 166_666))
        seconds = time.monotonic() - t0
        assert status == 400 and seconds < 2, (status, seconds)
        assert answer["error"]["message"].startswith("prompt is more than ")
        assert "the model's context is 4096" in answer["error"]["message"]

        # No key, 8 GB announced: answered from the headers alone, and the body is never read. The server
        # closes the connection, so sending more than the socket buffers hold fails long before 64 MB.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(_head(8 * 10**9, auth=None))
            t0 = time.monotonic()
            status, headers, _ = _read_response(s)
            assert status == 401 and time.monotonic() - t0 < 2 and headers["connection"] == "close"
            sent, chunk = 0, b"x" * MB
            with pytest.raises(OSError):
                while sent < 64 * MB:
                    s.sendall(chunk)
                    sent += len(chunk)
                    time.sleep(0.001)
            assert sent < 32 * MB, sent

        # 32 valid requests at once, right after: every one answered, identically.
        results: list = [None] * 32

        def ask(i: int) -> None:
            results[i] = _post(port, _body("What colour is the image?"), timeout=120)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert [r[0] for r in results] == [200] * 32, [r[2] for r in results if r[0] != 200][:2]
        assert len({r[2]["choices"][0]["message"]["content"] for r in results}) == 1

        peak = _peak_rss_mb(server.pid)
        print(f"server peak RSS {peak:.0f} MB")
        assert peak < 2048, peak
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# before the body: key, size, framing


def test_the_key_is_compared_in_constant_time(monkeypatch):
    import vopd_bench.serve as serve

    calls = []

    def compare(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(serve.hmac, "compare_digest", compare)
    with _server() as server:
        assert _post(server.port, _body(), auth="Bearer wrong")[0] == 401
        assert _post(server.port, _body())[0] == 200
    assert calls == [(b"Bearer wrong", AUTH.encode()), (AUTH.encode(), AUTH.encode())]


@pytest.mark.parametrize("head, status", [
    (_head(8 * 10**9, auth=None), 401),  # no key: refused before the size is even looked at
    (_head(8 * 10**9, auth="Bearer wrong"), 401),
    (_head(8 * 10**9), 413),  # the key, but over --max-body-mb
    (_head(None), 411),
    (_head(None, extra="Transfer-Encoding: chunked\r\n"), 411),
    (_head(None, extra="Content-Length: 12abc\r\n"), 400),
    (_head(None, extra="Content-Length: -5\r\n"), 400),
    (_head(10, extra="Content-Length: 20\r\n"), 400),  # two different sizes
])
def test_requests_are_refused_from_their_headers_before_any_body_is_sent(head, status):
    with _server() as server:
        got, headers, body = _raw(server.port, head)
        assert got == status, body
        assert server.stats.rejected[status] == 1 and server.stats.answered == 0


def test_a_refused_small_body_is_read_so_the_connection_stays_usable():
    """A wrong key on an ordinary request: the body is dropped, the 401 arrives, and the same connection then
    carries a valid request (a client sends its whole body before reading, so closing would reset it)."""
    with _server() as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=_body(), headers={"Authorization": "Bearer wrong"})
        r = conn.getresponse()
        assert r.status == 401 and not r.will_close
        r.read()
        conn.request("POST", "/v1/chat/completions", body=_body(), headers={"Authorization": AUTH})
        assert conn.getresponse().status == 200
        conn.close()


def test_expect_100_continue_is_answered_only_for_a_request_that_passes_the_header_checks():
    with _server() as server:
        status, _, _ = _raw(server.port, _head(50 * MB, auth=None, extra="Expect: 100-continue\r\n"))
        assert status == 401  # no 100 Continue: the client never sends its body
        body = _body()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(_head(len(body), extra="Expect: 100-continue\r\n"))
            assert s.recv(100).startswith(b"HTTP/1.1 100")
            s.sendall(body)
            assert _read_response(s)[0] == 200


# ---------------------------------------------------------------------------------------------------------------
# the body: JSON, settings, image, prompt


@pytest.mark.parametrize("body, status, message", [
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),  # nested past the parser's recursion limit
    (b"\xff\xfe{", 400, "not valid JSON"),
    (_body(model="other"), 404, "does not exist"),
    (_body(temperature="hot"), 400, "temperature"),
    (_body(temperature=[1]), 400, "temperature"),
    (_body(seed=2**70), 400, "seed"),
    (_body(max_tokens=True), 400, "max_tokens"),
    (_body(chat_template_kwargs={"chat_template": "{% for i in range(99999) %}x{% endfor %}"}), 400, "may not set"),
    (_body(chat_template_kwargs={"enable_thinking": [1, 2]}), 400, "plain values"),
    (_body(png=_bomb_png(20_000, 20_000)), 400, "over the 100 MP limit"),
])
def test_bad_bodies_are_400s(body, status, message):
    with _server() as server:
        t0 = time.monotonic()
        got, _, answer = _post(server.port, body)
        assert (got, time.monotonic() - t0 < 2) == (status, True)
        assert message in answer["error"]["message"]
        assert _post(server.port, _body())[0] == 200  # and the server goes on


def test_a_decoded_image_over_the_queue_memory_is_413():
    with _server(max_body_bytes=MB, max_queue_bytes=3 * MB) as server:
        status, _, answer = _post(server.port, _body(png=_png(2000, 2000)))  # 12 MB of pixels once decoded
        assert status == 413 and "--max-queue-mb" in answer["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------
# one client cannot starve the others


def test_slow_clients_are_cut_off_and_never_hold_up_a_valid_request():
    """Slow loris: one client drips its headers, another its body, a third only connects. Each is answered 408
    (or closed) at the read timeout, whatever it keeps sending, while a valid request is answered at once."""
    with _server(read_timeout=0.6) as server:
        body = _body()
        drips = []
        for head, rest in ((b"", _head(len(body))), (_head(len(body)), body)):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(head)
            drips.append((s, rest))
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        stop = threading.Event()

        def drip() -> None:
            for i in range(40):  # a byte every 50 ms: each read waits less than any per-read timeout
                for s, rest in drips:
                    try:
                        s.sendall(rest[i:i + 1])
                    except OSError:
                        pass
                if stop.wait(0.05):
                    return

        dripper = threading.Thread(target=drip)
        dripper.start()
        t0 = time.monotonic()
        assert _post(server.port, body)[0] == 200
        assert time.monotonic() - t0 < 0.5
        for s, _ in drips:
            assert _read_response(s)[0] == 408
            assert time.monotonic() - t0 < 1.5
        assert idle.recv(10) == b""  # closed without a word: it never started a request
        stop.set()
        dripper.join()
        for s, _ in drips:
            s.close()
        idle.close()


def test_a_full_queue_answers_429_with_retry_after_at_once():
    gate = Gate()
    with _server(gate, max_queue=2) as server:
        results = []
        threads = [threading.Thread(target=lambda q=q: results.append(_post(server.port, _body(q))))
                   for q in ("one", "two")]
        for t in threads:
            t.start()
        assert gate.entered.acquire(timeout=10)  # the first is in the model, the second queued behind it
        _wait_until(lambda: server.admission.in_use == 2)
        t0 = time.monotonic()
        status, headers, _ = _post(server.port, _body("three"))
        assert status == 429 and int(headers["Retry-After"]) >= 1 and time.monotonic() - t0 < 0.5
        gate.open.set()
        for t in threads:
            t.join(10)
        assert sorted(r[0] for r in results) == [200, 200]
        assert _post(server.port, _body("four"))[0] == 200
        assert gate.asked == ["one", "two", "four"] or gate.asked == ["two", "one", "four"]


def test_the_queue_memory_budget_is_reserved_before_a_body_is_read():
    """A 1 MB body reserves 3 MB while it is read: with a 3 MB budget a second one is refused (429) while the
    first still arrives, though the queue has room for requests."""
    with _server(max_body_bytes=MB, max_queue_bytes=3 * MB) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(_head(MB))  # and no body yet
            _wait_until(lambda: server.admission.held == 3 * MB)
            status, headers, _ = _raw(server.port, _head(MB) + b"x" * MB)
            assert status == 429 and "retry-after" in headers
        _wait_until(lambda: server.admission.in_use == 0)
        assert _post(server.port, _body())[0] == 200


def test_a_request_past_its_time_limit_is_503_and_one_still_queued_never_reaches_the_model():
    gate = Gate()
    with _server(gate, request_timeout=0.5) as server:
        results = {}
        threads = [threading.Thread(target=lambda q=q: results.__setitem__(q, _post(server.port, _body(q))))
                   for q in ("first", "second")]
        threads[0].start()
        assert gate.entered.acquire(timeout=10)
        threads[1].start()
        for t in threads:
            t.join(10)
        for q in ("first", "second"):
            status, headers, answer = results[q]
            assert status == 503 and "--request-timeout" in answer["error"]["message"] and "Retry-After" in headers
        gate.open.set()
        assert _post(server.port, _body("third"))[0] == 200
        assert gate.asked == ["first", "third"]  # "second" timed out in the queue and was dropped


def test_connections_over_the_limit_get_503_and_the_server_recovers():
    with _server(max_connections=3, read_timeout=5) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
        time.sleep(0.2)  # accepted: each holds a thread that waits for its request
        status, headers, answer = _raw(server.port, _head(len(_body())) + _body())
        assert status == 503 and headers["retry-after"] == "1" and "--max-connections" in answer.decode()
        idle.pop().close()
        time.sleep(0.2)
        assert _post(server.port, _body())[0] == 200
        for s in idle:
            s.close()
