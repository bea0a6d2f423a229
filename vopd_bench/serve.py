"""A small OpenAI-compatible chat-completions server in front of any Backend.

It exists to exercise the `openai` backend end to end without a GPU server: the tests serve the tiny model
through the `hf` backend, and `benchmarks/api_throughput.py` serves a backend with a fixed service time. It is
also handy for users who want to put a local model behind the HTTP API:

    python -m vopd_bench.serve toy --port 8000          # then: vopd gap-report toy --backend openai \\
                                                         #         --base-url http://127.0.0.1:8000/v1

Endpoints: `POST /v1/chat/completions` (one user message: an image as a data URI and text) and
`GET /v1/models`. Requests that arrive together are answered in one `backend.generate` batch.

Fault mode (`FaultConfig`) answers a share of requests with a 429, a 500, a stall followed by a dropped
connection (a client timeout when the stall is longer than the client waits), or a garbage body. Whether an
attempt fails is a deterministic function of the seed, the request body and how many times that body was seen,
so a run is reproducible whatever the arrival order, and every retry is a fresh draw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from vopd_bench.backends.base import Backend, GenerationConfig, Request, Response
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import load_image

FAULT_KINDS = ("429", "500", "timeout", "garbage")


@dataclass(frozen=True)
class FaultConfig:
    """Shares of attempts that fail, by kind. Their sum must stay below 1."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_garbage: float = 0.0
    timeout_sleep: float = 1.0  # seconds a "timeout" stalls before dropping the connection
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.rate_429, self.rate_500, self.rate_timeout, self.rate_garbage)
        if any(r < 0 for r in rates) or sum(rates) >= 1:
            raise VopdError("fault rates must be non-negative and sum to less than 1")

    def draw(self, body: bytes, nth: int) -> str | None:
        """The fault for the nth attempt (0-based) of this exact body, or None to answer normally."""
        h = hashlib.sha256(f"{self.seed}:{nth}:".encode() + hashlib.sha256(body).digest()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        edge = 0.0
        for kind, rate in zip(FAULT_KINDS, (self.rate_429, self.rate_500, self.rate_timeout, self.rate_garbage),
                              strict=True):
            edge += rate
            if u < edge:
                return kind
        return None


class Dispatcher:
    """Gathers the requests that arrive together into batches for the backend.

    A worker takes the first waiting request, then whatever else arrives within `window_s`, up to `max_batch`,
    and answers them with one `generate` call per generation config. Several workers suit backends that can run
    calls in parallel (a remote or simulated engine); a local model wants one.
    """

    def __init__(self, backend: Backend, *, max_batch: int | None = None, window_s: float = 0.005, workers: int = 1):
        self.backend = backend
        self.max_batch = max(1, max_batch or getattr(backend, "preferred_batch_size", 16) or 16)
        self.window_s = window_s
        self.batch_sizes: Counter[int] = Counter()
        self._queue: queue.Queue[tuple[Request, GenerationConfig, Future] | None] = queue.Queue()
        self._workers = [threading.Thread(target=self._work, name=f"vopd-serve-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for w in self._workers:
            w.start()

    def submit(self, request: Request, gen: GenerationConfig) -> Response:
        """Answer one request (blocking) as part of whatever batch it lands in."""
        done: Future[Response] = Future()
        self._queue.put((request, gen, done))
        return done.result()

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=5)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[tuple[Request, GenerationConfig, Future]]) -> None:
        groups: dict[str, list[tuple[Request, GenerationConfig, Future]]] = {}
        for item in batch:
            groups.setdefault(json.dumps(item[1].as_dict(), sort_keys=True), []).append(item)
        for items in groups.values():
            self.batch_sizes[len(items)] += 1
            try:
                responses = self.backend.generate([r for r, _, _ in items], items[0][1])
                if len(responses) != len(items):
                    raise RuntimeError(f"backend returned {len(responses)} answers for {len(items)} requests")
            except Exception as e:  # noqa: BLE001 - a broken batch answers each request with the error
                responses = [Response("", error=f"{type(e).__name__}: {e}")] * len(items)
            for (_, _, done), resp in zip(items, responses, strict=True):
                done.set_result(resp)


@dataclass
class ServerStats:
    """What the server saw: requests by outcome, faults by kind."""

    requests: int = 0
    answered: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    rejected: Counter[int] = field(default_factory=Counter)  # non-fault error statuses sent
    authorizations: Counter[str] = field(default_factory=Counter)  # "bearer", "none" or "wrong"


class ServerHandle:
    """A running server. `url` is the base URL clients use (ending in /v1)."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread, dispatcher: Dispatcher,
                 stats: ServerStats):
        self._httpd, self._thread, self.dispatcher, self.stats = httpd, thread, dispatcher, stats
        host, port = httpd.server_address[:2]
        self.port = port
        self.url = f"http://{host}:{port}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self.dispatcher.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default backlog of 5 drops connections when 64 clients open at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up waiting: not our error
            return
        super().handle_error(request, client_address)


def serve_backend(backend: Backend, host: str = "127.0.0.1", port: int = 0, faults: FaultConfig | None = None, *,
                  model_name: str | None = None, api_key: str | None = None, max_batch: int | None = None,
                  window_s: float = 0.005, workers: int = 1, decode_images: bool = True) -> ServerHandle:
    """Serve `backend` on host:port (0 = any free port) in background threads; returns at once.

    `model_name` is the name clients must ask for (default: the backend's `model_name`, else "vopd"). With
    `api_key`, requests without `Authorization: Bearer <api_key>` get a 401. `decode_images=False` hands the
    backend a 1x1 placeholder instead of the decoded image: for stand-in backends that never look at it, so a
    benchmark measures the client rather than the server's image decoding.
    """
    name = model_name or getattr(backend, "model_name", None) or "vopd"
    dispatcher = Dispatcher(backend, max_batch=max_batch, window_s=window_s, workers=workers)
    stats = ServerStats()
    handler = type("Handler", (_Handler,), {"backend": backend, "dispatcher": dispatcher, "faults": faults,
                                            "model_name": name, "api_key": api_key, "stats": stats,
                                            "decode_images": decode_images,
                                            "seen": Counter(), "lock": threading.Lock()})
    try:
        httpd = _HTTPServer((host, port), handler)
    except OSError as e:
        dispatcher.close()
        raise VopdError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="vopd-http-server",
                              daemon=True)
    thread.start()
    return ServerHandle(httpd, thread, dispatcher, stats)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connections
    timeout = 120  # drop idle keep-alive connections eventually
    disable_nagle_algorithm = True  # small answers go out at once instead of waiting for a delayed ACK
    wbufsize = -1  # buffered: headers and body leave in one write; http.server flushes after each request
    # Filled in per server by serve_backend.
    backend: Backend
    dispatcher: Dispatcher
    faults: FaultConfig | None
    model_name: str
    api_key: str | None
    stats: ServerStats
    decode_images: bool
    seen: Counter[str]
    lock: threading.Lock

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: tests and benchmarks
        pass

    # -- plumbing -------------------------------------------------------------------------------------------

    def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        with self.lock:
            self.stats.rejected[status] += 1
        self._send(status, json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode())

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization")
        with self.lock:
            self.stats.authorizations["none" if not header else
                                      "bearer" if header == f"Bearer {self.api_key}" else "wrong"] += 1
        return self.api_key is None or header == f"Bearer {self.api_key}"

    # -- endpoints ------------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        if self.path.rstrip("/") not in ("/v1/models", "/models"):
            return self._error(404, f"no route {self.path}")
        if not self._authorized():
            return self._error(401, "missing or wrong API key", "authentication_error")
        root = self.backend.fingerprint()
        model = {"id": self.model_name, "object": "model", "owned_by": "vopd", "root": root}
        self._send(200, json.dumps({"object": "list", "data": [model]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route {self.path}")
        with self.lock:
            self.stats.requests += 1
        if not self._authorized():
            return self._error(401, "missing or wrong API key", "authentication_error")
        if self.faults is not None and self._fault(body):
            return
        try:
            request, gen = parse_chat_request(json.loads(body), self.model_name, decode=self.decode_images)
        except (ValueError, SampleError) as e:
            status = 404 if isinstance(e, _UnknownModel) else 400
            return self._error(status, str(e))
        resp = self.dispatcher.submit(request, gen)
        if resp.error is not None:
            return self._error(500, resp.error, "server_error")
        with self.lock:
            self.stats.answered += 1
        self._send(200, json.dumps(completion_payload(self.model_name, resp.text, resp.tokens)).encode())

    def _fault(self, body: bytes) -> bool:
        """Inject this attempt's fault, if it draws one; True when the request was answered with it."""
        digest = hashlib.sha256(body).hexdigest()
        with self.lock:
            nth = self.seen[digest]
            self.seen[digest] += 1
        kind = self.faults.draw(body, nth)
        if kind is None:
            return False
        with self.lock:
            self.stats.faults[kind] += 1
        if kind == "429":
            self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit_error"}}')
        elif kind == "500":
            self._send(500, b'{"error": {"message": "injected failure", "type": "server_error"}}')
        elif kind == "timeout":
            time.sleep(self.faults.timeout_sleep)
            self.close_connection = True  # drop it without an answer
        else:
            self._send(200, _GARBAGE[nth % len(_GARBAGE)], "application/json")
        return True


# A 200 that is not a chat completion: markup, JSON of another shape, a body cut short.
_GARBAGE = (b"<html><body>502 Bad Gateway</body></html>", b'{"object": "error", "detail": "upstream reset"}',
            b'{"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"role": "assis')


class _UnknownModel(ValueError):
    pass


def parse_chat_request(body: Any, model_name: str, decode: bool = True) -> tuple[Request, GenerationConfig]:
    """The (request, generation config) a chat-completions body asks for; ValueError/SampleError if invalid."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ValueError("body must be a JSON object with a `messages` list")
    if body.get("model") != model_name:
        raise _UnknownModel(f"The model `{body.get('model')}` does not exist.")
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if len(users) != 1:
        raise ValueError("expected exactly one user message")
    content = users[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ValueError("message content must be a string or a list of parts")
    images = [p["image_url"]["url"] for p in parts if isinstance(p, dict) and p.get("type") == "image_url"
              and isinstance(p.get("image_url"), dict) and isinstance(p["image_url"].get("url"), str)]
    texts = [p["text"] for p in parts if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
    if len(images) != 1 or not images[0].startswith("data:image/"):
        raise ValueError("expected exactly one image, as a data:image/... URI")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 64
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(max_tokens, int) or max_tokens < 1 or not isinstance(kwargs, dict):
        raise ValueError("max_tokens must be a positive integer and chat_template_kwargs an object")
    gen = GenerationConfig(max_new_tokens=max_tokens, temperature=float(body.get("temperature") or 0.0),
                           seed=int(body.get("seed") or 0), chat_template_kwargs=kwargs)
    image = load_image(images[0]) if decode else Image.new("RGB", (1, 1))
    return Request(key="", image=image, prompt="".join(texts)), gen


def completion_payload(model_name: str, text: str, tokens: int | None = None) -> dict[str, Any]:
    payload = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if tokens is not None:  # as OpenAI and vLLM report it; the client's throughput figures read it
        payload["usage"] = {"completion_tokens": tokens}
    return payload


class SleepBackend:
    """A stand-in engine with a fixed service time: each `generate` call sleeps `seconds_per_call` plus
    `seconds_per_item` per request, then answers with a letter derived from the prompt. Used to measure HTTP
    clients without measuring a model."""

    name = "sleep"

    def __init__(self, seconds_per_call: float = 0.1, seconds_per_item: float = 0.0, preferred_batch_size: int = 64):
        self.seconds_per_call, self.seconds_per_item = seconds_per_call, seconds_per_item
        self.preferred_batch_size = preferred_batch_size
        self.model_name = "sleep"

    def fingerprint(self) -> str:
        return f"sleep:{self.seconds_per_call:g}:{self.seconds_per_item:g}"

    def generate(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        seconds = self.seconds_per_call + self.seconds_per_item * len(requests)
        time.sleep(seconds)
        return [Response("ABCD"[hashlib.sha256(r.prompt.encode()).digest()[0] % 4], seconds=seconds / len(requests))
                for r in requests]

    def close(self) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vopd_bench.serve",
                                 description="Serve a model through the hf backend as an OpenAI-compatible API.")
    ap.add_argument("model", help="`toy`, a local folder or a hub id")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default=None, help="the name clients ask for [default: MODEL]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--api-key-env", default=None, help="require the key held in this environment variable")
    args = ap.parse_args(argv)

    import os

    from vopd_bench.backends.hf import HFBackend

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        raise SystemExit(f"error: ${args.api_key_env} is not set")
    try:
        backend = HFBackend(args.model, batch_size=args.batch_size)
        server = serve_backend(backend, args.host, args.port, model_name=args.model_name or args.model, api_key=key)
    except VopdError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"serving {args.model} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
