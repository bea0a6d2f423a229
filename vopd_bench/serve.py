"""A small OpenAI-compatible chat-completions server in front of any Backend.

It exists to exercise the `openai` backend end to end without a GPU server: the tests serve the tiny model
through the `hf` backend, and `benchmarks/api_throughput.py` serves a backend with a fixed service time. It is
also handy for users who want to put a local model behind the HTTP API:

    python -m vopd_bench.serve toy --port 8000          # then: vopd gap-report toy --backend openai \\
                                                         #         --base-url http://127.0.0.1:8000/v1

Endpoints: `POST /v1/chat/completions` (one user message: an image as a data URI and text) and
`GET /v1/models`. Requests that arrive together are answered in one `backend.generate` batch.

Every request is bounded before the model sees it (`ServeLimits`, flags of `main`): the key is checked (in
constant time) and the declared body size read from the headers before any of the body is; a request must
arrive within the read timeout, find room in the queue (else 429 with Retry-After), fit the body limit (413),
carry an image within the pixel limit and a prompt within the model's context (400, by the same checks
gap-report makes: `images.load_image`, `context.PromptLength`), and be answered within the request timeout
(503). Each connection has its own thread; the model's work runs on the dispatcher's worker thread alone, and
prompts are counted on a copy of the processor of their own, so no tokeniser is ever used by two threads.

Fault mode (`FaultConfig`) answers a share of requests with a 429, a 500, a stall followed by a dropped
connection (a client timeout when the stall is longer than the client waits), or a garbage body. Whether an
attempt fails is a deterministic function of the seed, the request body and how many times that body was seen,
so a run is reproducible whatever the arrival order, and every retry is a fresh draw.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import hmac
import json
import math
import queue
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from vopd_bench.backends.base import Backend, GenerationConfig, Request, Response
from vopd_bench.context import PromptLength
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import load_image, set_max_pixels
from vopd_bench.serve_limits import MB, Admission, ReadDeadlines, ServeLimits, Ticket

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
    calls in parallel (a remote or simulated engine); a local model wants one: its work is then serialised on
    that thread. A request whose caller stopped waiting before a worker took it is dropped, never generated.
    """

    def __init__(self, backend: Backend, *, max_batch: int | None = None, window_s: float = 0.005, workers: int = 1):
        self.backend = backend
        self.max_batch = max(1, max_batch or getattr(backend, "preferred_batch_size", 16) or 16)
        self.window_s = window_s
        self.batch_sizes: Counter[int] = Counter()
        self.seconds_per_request = 0.0  # a moving average of the backend's time per answered request
        self._queue: queue.Queue[tuple[Request, GenerationConfig, Future] | None] = queue.Queue()
        self._workers = [threading.Thread(target=self._work, name=f"vopd-serve-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for w in self._workers:
            w.start()

    def submit(self, request: Request, gen: GenerationConfig, timeout: float | None = None) -> Response:
        """Answer one request (blocking) as part of whatever batch it lands in. TimeoutError after `timeout`
        seconds; the request is then dropped if no worker has taken it yet."""
        done: Future[Response] = Future()
        self._queue.put((request, gen, done))
        try:
            return done.result(timeout)
        except TimeoutError:
            done.cancel()  # only succeeds while it waits in the queue: work already started is not interrupted
            raise

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
            self._answer([item for item in batch if item[2].set_running_or_notify_cancel()])
            if stop:
                return

    def _answer(self, batch: list[tuple[Request, GenerationConfig, Future]]) -> None:
        groups: dict[str, list[tuple[Request, GenerationConfig, Future]]] = {}
        for item in batch:
            groups.setdefault(json.dumps(item[1].as_dict(), sort_keys=True), []).append(item)
        for items in groups.values():
            self.batch_sizes[len(items)] += 1
            t0 = time.perf_counter()
            try:
                responses = self.backend.generate([r for r, _, _ in items], items[0][1])
                if len(responses) != len(items):
                    raise RuntimeError(f"backend returned {len(responses)} answers for {len(items)} requests")
            except Exception as e:  # noqa: BLE001 - a broken batch answers each request with the error
                responses = [Response("", error=f"{type(e).__name__}: {e}")] * len(items)
            per = (time.perf_counter() - t0) / len(items)
            self.seconds_per_request = per if not self.seconds_per_request else 0.8 * self.seconds_per_request + 0.2 * per
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

    def __init__(self, httpd: _HTTPServer, thread: threading.Thread, dispatcher: Dispatcher, stats: ServerStats):
        self._httpd, self._thread, self.dispatcher, self.stats = httpd, thread, dispatcher, stats
        host, port = httpd.server_address[:2]
        self.port = port
        self.url = f"http://{host}:{port}/v1"

    @property
    def admission(self) -> Admission:
        return self._httpd.admission

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd.deadlines.close()
        self.dispatcher.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `limits.max_connections` of them: one more is answered 503 and closed
    from the accepting thread, so idle or slow connections can never take every thread."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default backlog of 5 drops connections when 64 clients open at once

    def __init__(self, address: tuple[str, int], handler: type, limits: ServeLimits):
        self.limits = limits
        self.admission = Admission(limits.max_queue, limits.max_queue_bytes)
        self.deadlines = ReadDeadlines()
        self._connections = 0
        self._count_lock = threading.Lock()
        try:
            super().__init__(address, handler)
        except BaseException:
            self.deadlines.close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            full = self._connections >= self.limits.max_connections
            if not full:
                self._connections += 1
        if full:
            _turn_away(request, self.limits.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the place back
            with self._count_lock:
                self._connections -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.forget(request)
            with self._count_lock:
                self._connections -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that gave up or stalled
            return
        super().handle_error(request, client_address)


def _turn_away(sock: socket.socket, limit: int) -> None:
    """Answer a connection over the limit with a 503 without reading its request. What the client has already
    sent is drained first (without waiting for more), so that closing does not reset the connection before the
    client reads the answer."""
    body = json.dumps({"error": {"message": f"the server has {limit} open connections, its limit "
                                 "(--max-connections); retry shortly", "type": "server_error", "code": 503}})
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    try:
        sock.setblocking(False)  # the accepting thread never waits on this client
        sock.send((head + body).encode())
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(65536):
                break
    except OSError:  # BlockingIOError included: nothing more has arrived
        pass


def serve_backend(backend: Backend, host: str = "127.0.0.1", port: int = 0, faults: FaultConfig | None = None, *,
                  model_name: str | None = None, api_key: str | None = None, max_batch: int | None = None,
                  window_s: float = 0.005, workers: int = 1, decode_images: bool = True,
                  limits: ServeLimits | None = None) -> ServerHandle:
    """Serve `backend` on host:port (0 = any free port) in background threads; returns at once.

    `model_name` is the name clients must ask for (default: the backend's `model_name`, else "vopd"). With
    `api_key`, requests without `Authorization: Bearer <api_key>` get a 401. `decode_images=False` hands the
    backend a 1x1 placeholder instead of the decoded image: for stand-in backends that never look at it, so a
    benchmark measures the client rather than the server's image decoding. `limits` bounds each request (see
    `ServeLimits`); a backend with a `prompt_length` check (the hf backend) has every prompt checked against
    the model's context before it is queued.
    """
    name = model_name or getattr(backend, "model_name", None) or "vopd"
    limits = limits or ServeLimits()
    lengths: PromptLength | None = getattr(backend, "prompt_length", None)
    # The request threads count prompts on a copy of their own: the backend's worker thread uses the original
    # processor, and a fast tokeniser must not be used by two threads at once.
    checker = copy.deepcopy(lengths) if lengths is not None else None
    dispatcher = Dispatcher(backend, max_batch=max_batch, window_s=window_s, workers=workers)
    stats = ServerStats()
    expected = f"Bearer {api_key}".encode() if api_key is not None else None
    handler = type("Handler", (_Handler,), {
        "backend": backend, "dispatcher": dispatcher, "faults": faults, "model_name": name, "api_key": api_key,
        "expected_authorization": expected, "stats": stats, "decode_images": decode_images, "limits": limits,
        "checker": checker, "checker_lock": threading.Lock(), "preparing": threading.BoundedSemaphore(2),
        "root": backend.fingerprint(), "seen": Counter(), "lock": threading.Lock()})
    try:
        httpd = _HTTPServer((host, port), handler, limits)
    except OSError as e:
        dispatcher.close()
        raise VopdError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="vopd-http-server",
                              daemon=True)
    thread.start()
    return ServerHandle(httpd, thread, dispatcher, stats)


_ROUTES_POST = ("/v1/chat/completions", "/chat/completions")
_ROUTES_GET = ("/v1/models", "/models")
_DIGITS = re.compile(r"[0-9]{1,19}")
_DISCARD_LIMIT = MB  # a refused request's body up to this size is read and dropped, keeping the connection


class _Refused(Exception):
    """A request answered with an error; raised where it is found, answered once by the endpoint."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.retry_after = status, kind, retry_after


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connections
    default_request_version = "HTTP/1.1"  # even an answer to a garbled request line has a status line
    timeout = None  # socket timeouts are set per request from the limits (handle_one_request)
    disable_nagle_algorithm = True  # small answers go out at once instead of waiting for a delayed ACK
    wbufsize = -1  # buffered: headers and body leave in one write; http.server flushes after each request
    # Filled in per server by serve_backend.
    backend: Backend
    dispatcher: Dispatcher
    faults: FaultConfig | None
    model_name: str
    api_key: str | None
    expected_authorization: bytes | None
    stats: ServerStats
    decode_images: bool
    limits: ServeLimits
    checker: PromptLength | None
    checker_lock: threading.Lock
    preparing: threading.BoundedSemaphore
    root: str
    seen: Counter[str]
    lock: threading.Lock
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: tests and benchmarks
        pass

    # -- plumbing -------------------------------------------------------------------------------------------

    def handle_one_request(self) -> None:
        """Wait up to the read timeout for a request to start; then the whole of it (headers and body) must
        arrive within the read timeout too."""
        self._length: int | None = None  # the declared body size, once checked
        self._ticket: Ticket | None = None  # the request's place in the queue, once it has one
        self._gated = False
        try:
            self.connection.settimeout(self.limits.read_timeout)
            if not self.rfile.peek(1):  # the client closed the connection
                self.close_connection = True
                return
        except OSError:  # idle for the whole read timeout, or reset
            self.close_connection = True
            return
        self.server.deadlines.watch(self.connection, self.limits.read_timeout)
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.stop(self.connection)

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: the checks made before a body is read decide whether the client sends it."""
        if self.command == "POST":
            try:
                self._gate()
            except _Refused as r:
                self._answer_refusal(r)
                return False
        self.send_response_only(100)
        self.end_headers()
        self.wfile.flush()
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a garbled request line, headers too long, an unknown method) in the API's
        JSON shape; a request cut off at the read timeout is a 408, whatever it looked like when cut."""
        self.close_connection = True
        if self.server.deadlines.is_cut(self.connection):
            code, message = 408, f"the request did not arrive within {self.limits.read_timeout:g} s (--read-timeout)"
        self._error(code, message or HTTPStatus(code).phrase)

    def _send(self, status: int, payload: bytes, content_type: str = "application/json",
              retry_after: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error",
               retry_after: int | None = None) -> None:
        with self.lock:
            self.stats.rejected[status] += 1
        self._send(status, json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode(),
                   retry_after=retry_after)

    def _answer_refusal(self, r: _Refused) -> None:
        """Answer a request refused before its body was read. A small declared body is read and dropped so the
        connection stays usable (and the client, which sends its whole body before reading, sees the answer);
        a larger or unknown one is never read, and the connection closes."""
        length = self._declared_length()
        if length is None or length > min(_DISCARD_LIMIT, self.limits.max_body_bytes) or r.status == 408:
            self.close_connection = True
        elif length and not self._discard_body(length):
            self.close_connection = True
        self._error(r.status, str(r), r.kind, r.retry_after)

    def _declared_length(self) -> int | None:
        """The body size the headers declare: None when they declare none, or not exactly one well-formed one."""
        declared = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if "Transfer-Encoding" in self.headers or len(declared) != 1:
            return None
        value = declared.pop()
        return int(value) if _DIGITS.fullmatch(value) else None

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization")
        # constant time: how long the comparison takes says nothing about how much of the key was right
        match = (self.expected_authorization is not None and header is not None
                 and hmac.compare_digest(header.encode("latin-1", "replace"), self.expected_authorization))
        with self.lock:
            self.stats.authorizations["none" if not header else "bearer" if match else "wrong"] += 1
        return self.api_key is None or match

    def _retry_after(self) -> int:
        """Seconds until the queue ahead has likely drained, from the backend's recent time per request."""
        waiting = self.server.admission.in_use
        return max(1, min(60, math.ceil(waiting * self.dispatcher.seconds_per_request)))

    def _gate(self) -> None:
        """The checks made from the headers alone, before any of the body is read: route, key, declared size,
        room in the queue. Raises _Refused; sets `_length` and takes a queue ticket when they pass."""
        self._gated = True
        if self.server.deadlines.is_cut(self.connection):
            raise _Refused(408, f"the request did not arrive within {self.limits.read_timeout:g} s (--read-timeout)")
        if self.path.rstrip("/") not in _ROUTES_POST:
            raise _Refused(404, f"no route {self.path}")
        with self.lock:
            self.stats.requests += 1
        if not self._authorized():
            raise _Refused(401, "missing or wrong API key", "authentication_error")
        if "Transfer-Encoding" in self.headers:
            raise _Refused(411, "send the body with a Content-Length; chunked bodies are not accepted")
        if not self.headers.get_all("Content-Length"):
            raise _Refused(411, "a Content-Length header is required")
        self._length = self._declared_length()
        if self._length is None:
            raise _Refused(400, "malformed Content-Length")
        if self._length > self.limits.max_body_bytes:
            raise _Refused(413, f"the body is {self._length / MB:.1f} MB, over this server's limit of "
                                f"{self.limits.max_body_bytes / MB:g} MB (--max-body-mb)")
        self._ticket = self.server.admission.enter(3 * self._length)
        if self._ticket is None:
            raise _Refused(429, f"the server is busy ({self.limits.max_queue} requests or "
                                f"{self.limits.max_queue_bytes / MB:g} MB queued, its limits); retry shortly",
                           "rate_limit_error", retry_after=self._retry_after())

    def _read_body(self, length: int) -> bytes | None:
        """The body, or None when the client went away or did not send it within the read timeout."""
        try:
            body = self.rfile.read(length)
        except OSError:
            body = b""
        return body if len(body) == length else None

    def _discard_body(self, length: int) -> bool:
        """Read and drop `length` bytes, a piece at a time; False when they did not all arrive in time."""
        try:
            while length > 0:
                got = self.rfile.read1(min(length, 65536))
                if not got:
                    return False
                length -= len(got)
        except OSError:
            return False
        return True

    # -- endpoints ------------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body on a GET is never read: the connection cannot be reused
        if self.server.deadlines.is_cut(self.connection):
            self.close_connection = True
            return self._error(408, f"the request did not arrive within {self.limits.read_timeout:g} s")
        if self.path.rstrip("/") not in _ROUTES_GET:
            return self._error(404, f"no route {self.path}")
        if not self._authorized():
            return self._error(401, "missing or wrong API key", "authentication_error")
        model = {"id": self.model_name, "object": "model", "owned_by": "vopd", "root": self.root}
        self._send(200, json.dumps({"object": "list", "data": [model]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        try:
            if not self._gated:
                try:
                    self._gate()
                except _Refused as r:
                    return self._answer_refusal(r)
            assert self._ticket is not None and self._length is not None
            try:
                request, gen = self._receive(self._length, self._ticket)
                deadline = self._ticket.since + self.limits.request_timeout
                resp = self.dispatcher.submit(request, gen, timeout=max(0.0, deadline - time.monotonic()))
            except _Refused as r:
                return self._error(r.status, str(r), r.kind, r.retry_after)
            except TimeoutError:
                return self._error(503, f"no answer within {self.limits.request_timeout:g} s (--request-timeout)",
                                   "server_error", retry_after=self._retry_after())
            except _Answered:
                return
            if resp.error is not None:
                return self._error(500, resp.error, "server_error")
            with self.lock:
                self.stats.answered += 1
            self._send(200, json.dumps(completion_payload(self.model_name, resp.text, resp.tokens)).encode())
        finally:
            if self._ticket is not None:
                self._ticket.release()
                self._ticket = None

    def _receive(self, length: int, ticket: Ticket) -> tuple[Request, GenerationConfig]:
        """Read, parse, decode and check one request's body. Raises _Refused, or _Answered for a fault."""
        body = self._read_body(length)
        self.server.deadlines.stop(self.connection)  # the model's time does not count against reading
        if body is None:  # cut off at the read timeout, or the client closed its side early
            self.close_connection = True
            raise _Refused(408, f"the body did not arrive in full within {self.limits.read_timeout:g} s "
                                "(--read-timeout)")
        if self.faults is not None and self._fault(body):
            raise _Answered
        deadline = ticket.since + self.limits.request_timeout
        # Parsing and decoding, two requests at a time: their transient memory (a decoded image, the JSON of a
        # large body) is held by few requests at once, and one slow decode does not hold up every other.
        if not self.preparing.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError
        try:
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError) as e:
                raise _Refused(400, f"the body is not valid JSON: {type(e).__name__}") from None
            del body
            try:
                request, gen = parse_chat_request(payload, self.model_name, decode=self.decode_images)
            except _UnknownModel as e:
                raise _Refused(404, str(e)) from None
            except (ValueError, SampleError) as e:
                raise _Refused(400, str(e)) from None
            del payload
            if self.checker is not None:
                self._check_length(request, gen)
        finally:
            self.preparing.release()
        held = request.image.width * request.image.height * 3 + sys.getsizeof(request.prompt)
        if held > self.limits.max_queue_bytes:
            raise _Refused(413, f"the request needs {held / MB:.0f} MB once decoded, over this server's "
                                f"{self.limits.max_queue_bytes / MB:g} MB (--max-queue-mb)")
        if not ticket.resize(held):
            raise _Refused(429, "the server is busy (its queue's memory limit, --max-queue-mb); retry shortly",
                           "rate_limit_error", retry_after=self._retry_after())
        return request, gen

    def _check_length(self, request: Request, gen: GenerationConfig) -> None:
        """The prompt against the model's context, as gap-report checks it (`PromptLength.check`)."""
        with self.checker_lock:
            try:
                self.checker.check(request.prompt, [request.image.size], gen.max_new_tokens,
                                   **gen.chat_template_kwargs)
            except SampleError as e:
                raise _Refused(400, str(e)) from None
            except Exception as e:  # noqa: BLE001 - a template that cannot be built from these arguments
                raise _Refused(400, f"cannot build the prompt: {type(e).__name__}: {e}") from None

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


class _Answered(Exception):
    """The request needs no (further) answer: a fault was injected, or the client went away."""


# A 200 that is not a chat completion: markup, JSON of another shape, a body cut short.
_GARBAGE = (b"<html><body>502 Bad Gateway</body></html>", b'{"object": "error", "detail": "upstream reset"}',
            b'{"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"role": "assis')


class _UnknownModel(ValueError):
    pass


# Arguments of the chat template call itself, which a request must not set: they would replace the template
# (`chat_template`: arbitrary code for the template engine) or change what the call returns.
_RESERVED_TEMPLATE_KWARGS = frozenset({"chat_template", "tokenize", "add_generation_prompt", "continue_final_message",
                                       "return_dict", "return_tensors", "return_assistant_tokens_mask", "tools",
                                       "documents", "padding", "truncation", "max_length", "tokenizer_kwargs",
                                       "processor_kwargs", "conversation"})


def parse_chat_request(body: Any, model_name: str, decode: bool = True) -> tuple[Request, GenerationConfig]:
    """The (request, generation config) a chat-completions body asks for; ValueError/SampleError if invalid.
    The image is decoded with `images.load_image`, so the pixel limit applies before any pixel is decoded."""
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
    gen = _generation(body)
    image = load_image(images[0]) if decode else Image.new("RGB", (1, 1))
    return Request(key="", image=image, prompt="".join(texts)), gen


def _generation(body: dict[str, Any]) -> GenerationConfig:
    """The generation settings of a body, each checked for its type and range."""
    def number(name: str, default: float) -> float:
        v = body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a non-negative number")
        return v

    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 64
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("max_tokens must be a positive integer")
    seed = number("seed", 0)
    if not isinstance(seed, int) or seed >= 2**63:
        raise ValueError("seed must be an integer from 0 to 2**63 - 1")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str)))
                                               for k, v in kwargs.items()):
        raise ValueError("chat_template_kwargs must be an object of plain values")
    if reserved := sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys()):
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    return GenerationConfig(max_new_tokens=max_tokens, temperature=float(number("temperature", 0.0)), seed=seed,
                            chat_template_kwargs=kwargs)


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
    d = ServeLimits()
    ap = argparse.ArgumentParser(prog="python -m vopd_bench.serve",
                                 description="Serve a model through the hf backend as an OpenAI-compatible API.")
    ap.add_argument("model", help="`toy`, a local folder or a hub id")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on [default: loopback only]")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default=None, help="the name clients ask for [default: MODEL]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--api-key-env", default=None, help="require the key held in this environment variable")
    ap.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MB,
                    help="largest request body; a larger declared one is refused (413) unread [default: %(default)g]")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help="requests in the server at once; more are refused (429) [default: %(default)s]")
    ap.add_argument("--max-queue-mb", type=float, default=d.max_queue_bytes / MB,
                    help="memory those requests may hold together (bodies, then decoded images); more are "
                         "refused (429) [default: %(default)g]")
    ap.add_argument("--request-timeout", type=float, default=d.request_timeout,
                    help="seconds from a request's arrival to its answer, else 503 [default: %(default)g]")
    ap.add_argument("--read-timeout", type=float, default=d.read_timeout,
                    help="seconds a client has to send a whole request (else 408), and that an idle connection "
                         "stays open [default: %(default)g]")
    ap.add_argument("--max-connections", type=int, default=d.max_connections,
                    help="open connections; more are answered 503 and closed [default: %(default)s]")
    ap.add_argument("--max-image-pixels", type=int, default=100_000_000,
                    help="largest image, read from its header before decoding; a larger one is refused (400), "
                         "as in gap-report [default: %(default)s]")
    args = ap.parse_args(argv)

    import os

    from vopd_bench.backends.hf import HFBackend

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        raise SystemExit(f"error: ${args.api_key_env} is not set")
    try:
        set_max_pixels(args.max_image_pixels)
        limits = ServeLimits(max_body_bytes=int(args.max_body_mb * MB), max_queue=args.max_queue,
                             max_queue_bytes=int(args.max_queue_mb * MB), request_timeout=args.request_timeout,
                             read_timeout=args.read_timeout, max_connections=args.max_connections)
        backend = HFBackend(args.model, batch_size=args.batch_size)
        server = serve_backend(backend, args.host, args.port, model_name=args.model_name or args.model, api_key=key,
                               limits=limits)
    except VopdError as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    print(f"serving {args.model} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
