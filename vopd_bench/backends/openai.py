"""The `openai` backend: any OpenAI-compatible chat-completions server (vLLM, SGLang, TGI, hosted APIs).

Each request is one user message holding the image (a PNG data URI, so the server sees the exact pixels) and
then the question, the layout of the paper's own evaluation. Up to `concurrency` requests are in flight at once,
each on its own worker thread with its own keep-alive connection (the standard library's `http.client`: about
0.2 ms of CPU per request, where a shared async connection pool cost us several ms at this concurrency). Images
are encoded by a few other threads ahead of sending, so encoding overlaps the network wait instead of holding a
connection idle.

Failures are retried with exponential backoff and jitter: 408, 429 and 5xx statuses, timeouts, dropped
connections and bodies that are not a chat completion. Other 4xx statuses (a bad request, an unknown model) are
not retried. A request that still fails becomes a Response with `error` set, so the run records it and goes on;
the record store retries errored records on the next run. `timeout` bounds each wait on the socket (connecting,
and the silence before and within the answer), as in most HTTP clients.

The API key is read from an environment variable (named by `api_key_env`), sent as a Bearer header and kept
nowhere else: not in the fingerprint, the options, the records or any message.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from vopd_bench.backends.base import GenerationConfig, Request, Response
from vopd_bench.errors import VopdError

# Statuses worth another try: the server is overloaded, restarting or briefly broken.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Keep-alive connections idle longer than this are reopened rather than reused: uvicorn (vLLM's server) closes
# idle connections after 5 s, and a request sent on a closed one fails.
_MAX_IDLE = 4.0
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)

Body = dict[str, Any] | Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class ChatResult:
    text: str | None  # None when the request failed
    error: str | None = None
    attempts: int = 1
    tokens: int | None = None  # usage.completion_tokens, when the server reports it


class _Malformed(Exception):
    """A 200 response whose body is not a chat completion."""


def normalize_base_url(base_url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1/` both mean `http://host:8000/v1`; other paths are kept."""
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise VopdError(f"--base-url must be an http(s) URL such as http://localhost:8000/v1, not {base_url!r}")
    if parts.path in ("", "/"):
        url += "/v1"
    return url


def image_data_uri(image: Image.Image, fmt: str = "png") -> str:
    """PNG is lossless, so a server answers exactly as the model would on the pixels we hold. Level 1 with
    zlib's run-length strategy: for photographs about 1.5x faster than level 1 alone and 1.8x faster than the
    default level, and no larger (PNG's row filters leave runs that RLE catches). JPEG (quality 95) is several
    times cheaper still, but lossy."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
        mime = "image/png"
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
        mime = "image/jpeg"
    else:
        raise VopdError(f"image format must be png or jpeg, not {fmt!r}")
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def chat_body(model_name: str, request: Request, gen: GenerationConfig, image_format: str = "png") -> dict[str, Any]:
    """The chat-completions body for one request: the image(s) first, then the question."""
    body: dict[str, Any] = {
        "model": model_name,
        "messages": [{"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": image_data_uri(im, image_format)}} for im in request.images),
            {"type": "text", "text": request.prompt},
        ]}],
        "max_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "seed": gen.seed,
    }
    if gen.chat_template_kwargs:
        body["chat_template_kwargs"] = dict(gen.chat_template_kwargs)
    return body


def completion_text(payload: bytes) -> str:
    """The assistant's text from a chat-completion body; raises _Malformed for anything else."""
    try:
        data = json.loads(payload)
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Malformed(f"not a chat completion: {_snippet(payload)}") from None
    if not isinstance(message, dict):
        raise _Malformed("choices[0].message is not an object")
    content = message.get("content")
    if content is None:  # e.g. a reasoning model that spent the whole budget thinking: an empty answer
        return ""
    if isinstance(content, list):  # content parts, as a few servers return them
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)).strip()
    if not isinstance(content, str):
        raise _Malformed(f"message content is a {type(content).__name__}")
    return content.strip()


def completion_tokens(payload: bytes) -> int | None:
    """`usage.completion_tokens` of a chat-completion body, or None when the server does not report it."""
    try:
        n = json.loads(payload)["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) and n >= 0 else None


def _snippet(payload: bytes | str, n: int = 160) -> str:
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    text = " ".join(text.split())
    return (text[:n] + ("…" if len(text) > n else "")) if text else "(empty body)"


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return min(max(float(value), 0.0), cap) if value else 0.0
    except ValueError:  # an HTTP date: rare from model servers; our own backoff applies
        return 0.0


def _encode(body: Body) -> bytes:
    return json.dumps(body() if callable(body) else body, ensure_ascii=False).encode("utf-8")


class _Conn:
    """One keep-alive connection and when it was last used."""

    def __init__(self, conn: http.client.HTTPConnection):
        self.conn, self.used, self.last = conn, False, time.monotonic()


class ChatClient:
    """Chat-completions over HTTP with bounded concurrency and retries. Thread-based and dependency-free.

    Shared by the `openai` backend and the LLM judge.
    """

    def __init__(self, base_url: str, *, api_key_env: str | None = "OPENAI_API_KEY", concurrency: int = 64,
                 timeout: float = 60.0, max_retries: int = 6, backoff_base: float = 0.5, backoff_max: float = 30.0):
        if concurrency < 1 or timeout <= 0 or max_retries < 0 or backoff_base < 0:
            raise VopdError("concurrency and timeout must be positive, max_retries and backoff non-negative")
        self.base_url = normalize_base_url(base_url)
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        parts = urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path
        self._proxy = _proxy_for(parts.scheme, self._host)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._key_env = api_key_env
        self._rng = random.Random()
        self._local = threading.local()
        self._open: set[_Conn] = set()
        self._lock = threading.Lock()
        self._senders = ThreadPoolExecutor(concurrency, thread_name_prefix="vopd-http")
        # Image encoding is CPU work that releases the GIL: one thread per core does it ahead of the senders.
        self._encoders = ThreadPoolExecutor(min(16, os.cpu_count() or 1), thread_name_prefix="vopd-encode")
        self._closed = False

    # -- public calls ---------------------------------------------------------------------------------------

    def get_json(self, path: str, retries: int = 2) -> tuple[int, Any]:
        """GET `base_url + path`: (status, parsed body or None). Raises VopdError when the server is unreachable."""
        for attempt in range(retries + 1):
            try:
                status, _, data = self._request("GET", path, None, timeout=min(self.timeout, 10.0))
                break
            except (OSError, http.client.HTTPException) as e:
                if attempt == retries:
                    why = "timed out" if isinstance(e, TimeoutError) else (e.strerror if isinstance(e, OSError)
                                                                         and e.strerror else type(e).__name__)
                    raise VopdError(f"cannot reach the server at {self.base_url} ({why})") from None
                time.sleep(self._delay(attempt))
        try:
            return status, json.loads(data)
        except ValueError:
            return status, None

    def served_model(self, model_name: str) -> dict[str, Any]:
        """The server's `/models` entry for `model_name` ({} when it lists none). Fails fast, with a VopdError,
        on an unreachable server, a refused key or a model the server does not serve."""
        status, data = self.get_json("/models")
        if status in (401, 403):
            hint = f" (is ${self._key_env} set?)" if self._key_env else ""
            raise VopdError(f"the server at {self.base_url} refused the request with HTTP {status}{hint}")
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
            return {}  # some servers do not list models; the first request will tell
        served = [m for m in data["data"] if isinstance(m, dict) and "id" in m]
        for m in served:
            if m["id"] == model_name:
                return m
        if served:
            names = ", ".join(str(m["id"]) for m in served[:8])
            raise VopdError(f"the server at {self.base_url} does not serve {model_name!r}; it serves {names}")
        return {}

    def complete(self, bodies: Sequence[Body]) -> list[ChatResult]:
        """POST every body to /chat/completions, `concurrency` at a time; one ChatResult per body, in order.
        A callable body is built (image encoding included) by the encoding threads shortly before it is sent."""
        ahead = threading.Semaphore(2 * self.concurrency)  # encoded but unsent bodies: bounds memory

        def encode(body: Body) -> bytes:
            ahead.acquire()
            return _encode(body)

        def send(encoded: Future[bytes]) -> ChatResult:
            try:
                content = encoded.result()
            except Exception as e:  # noqa: BLE001 - one unencodable image must not sink the batch
                return ChatResult(None, f"cannot build the request: {type(e).__name__}: {e}", attempts=0)
            finally:
                ahead.release()
            return self._post(content)

        encoded = [self._encoders.submit(encode, b) for b in bodies]
        sent = [self._senders.submit(send, e) for e in encoded]
        try:
            return [s.result() for s in sent]
        except BaseException:  # Ctrl-C: drop what has not started instead of sending it
            for f in (*sent, *encoded):
                f.cancel()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._senders.shutdown(wait=False, cancel_futures=True)
        self._encoders.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for c in self._open:
                c.conn.close()
            self._open.clear()

    # -- one request ----------------------------------------------------------------------------------------

    def _post(self, content: bytes) -> ChatResult:
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            try:
                status, headers, data = self._request("POST", "/chat/completions", content)
            except TimeoutError:
                last = f"timed out after {self.timeout:g} s"
            except (OSError, http.client.HTTPException) as e:
                last = f"connection error ({type(e).__name__})"
            else:
                if status == 200:
                    try:
                        return ChatResult(completion_text(data), attempts=attempt + 1, tokens=completion_tokens(data))
                    except _Malformed as e:
                        last = f"malformed response: {e}"
                else:
                    last = f"HTTP {status}: {_snippet(data)}"
                    if status not in RETRY_STATUSES and status < 500:
                        return ChatResult(None, last, attempts=attempt + 1)
                    retry_after = _retry_after(headers.get("retry-after"), self.backoff_max)
            if attempt < self.max_retries:
                time.sleep(max(retry_after, self._delay(attempt)))
        return ChatResult(None, f"{last} (gave up after {self.max_retries + 1} attempts)", attempts=self.max_retries + 1)

    def _request(self, method: str, path: str, body: bytes | None,
                 timeout: float | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One HTTP exchange on this thread's keep-alive connection. Raises OSError/HTTPException on failure,
        after closing the connection (its state is unknown). A reused connection that the server had already
        closed is retried once on a fresh one, as browsers and urllib3 do."""
        target = self._path + path
        if self._proxy is not None and not self._https:
            target = f"http://{self._host}:{self._port}{target}"  # a plain-HTTP proxy wants the absolute URL
        for fresh_retry in (False, True):
            c = self._connection(timeout)
            reused = c.used
            try:
                c.conn.request(method, target, body=body, headers=self._headers)
                r = c.conn.getresponse()
                data = r.read()
            except BaseException as e:
                self._discard(c)
                if reused and not fresh_retry and isinstance(e, _STALE):
                    continue
                raise
            c.used, c.last = True, time.monotonic()
            if r.will_close:
                self._discard(c)
            return r.status, r.headers, data
        raise AssertionError("unreachable")

    def _connection(self, timeout: float | None) -> _Conn:
        c: _Conn | None = getattr(self._local, "conn", None)
        if c is not None and time.monotonic() - c.last > _MAX_IDLE:
            self._discard(c)
            c = None
        if c is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            if self._proxy is None:
                conn = cls(self._host, self._port, timeout=timeout or self.timeout)
            else:
                conn = cls(*self._proxy, timeout=timeout or self.timeout)
                if self._https:
                    conn.set_tunnel(self._host, self._port)
            c = self._local.conn = _Conn(conn)
            with self._lock:
                self._open.add(c)
        return c

    def _discard(self, c: _Conn) -> None:
        c.conn.close()
        with self._lock:
            self._open.discard(c)
        if getattr(self._local, "conn", None) is c:
            self._local.conn = None

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: uniformly between half and all of base·2^attempt, capped."""
        cap = min(self.backoff_max, self.backoff_base * 2 ** max(attempt, 0))
        return cap * (0.5 + 0.5 * self._rng.random())


def _proxy_for(scheme: str, host: str) -> tuple[str, int] | None:
    """The proxy from HTTP(S)_PROXY / NO_PROXY for this host; never for loopback."""
    if host in ("localhost", "::1") or host.startswith("127."):
        return None
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return (p.hostname, p.port or 80) if p.hostname else None


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str, *, base_url: str, model_name: str | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY", concurrency: int = 64, timeout: float = 60.0,
                 max_retries: int = 6, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 image_format: str = "png", batch_size: int = 16, trust_remote_code: bool = False, **_: Any):
        if image_format not in ("png", "jpeg"):
            raise VopdError(f"image format must be png or jpeg, not {image_format!r}")
        self.model_name = model_name or model
        self.image_format = image_format
        # The runner waits for a whole batch: several waves per batch keep the concurrency busy.
        self.preferred_batch_size = max(batch_size, 4 * concurrency)
        self.client = ChatClient(base_url, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                                 max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max)
        try:
            self.server_model = self.client.served_model(self.model_name)
        except BaseException:
            self.client.close()
            raise

    @property
    def base_url(self) -> str:
        return self.client.base_url

    def fingerprint(self) -> str:
        """The served model: its name plus the weights the server says it loaded (`root`, as vLLM reports it).
        Not the URL: a server restarted on another port or host serves the same answers, so its records resume;
        another model under the same name has another `root` and never does. A server that lists no models
        leaves only the name."""
        fp = f"openai:{self.model_name}"
        root = self.server_model.get("root")
        if isinstance(root, str) and root and root != self.model_name:
            fp += f":{root}"
        return fp

    def generate(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        if not requests:
            return []
        start = time.perf_counter()
        bodies = [_Body(self.model_name, r, gen, self.image_format) for r in requests]
        results = self.client.complete(bodies)
        # Like the hf backend: each request is attributed an equal share of the batch's wall time.
        per = (time.perf_counter() - start) / len(requests)
        return [Response(res.text, seconds=per, tokens=res.tokens) if res.error is None
                else Response("", error=res.error, seconds=per) for res in results]

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class _Body:
    """A request body built lazily, in the encoding pool, just before it is sent."""

    model_name: str
    request: Request
    gen: GenerationConfig
    image_format: str

    def __call__(self) -> dict[str, Any]:
        return chat_body(self.model_name, self.request, self.gen, self.image_format)


__all__ = ["OpenAIBackend", "ChatClient", "ChatResult", "chat_body", "completion_text", "image_data_uri",
           "normalize_base_url", "RETRY_STATUSES"]
