"""What one request may take of the OpenAI-compatible server (`vopd_bench.serve`), and the two mechanisms that
hold every request to it.

`Admission`: at most `max_queue` requests are in the server at once (being read, prepared, queued for the model
or answered), and together they hold at most `max_queue_bytes`: a request reserves three times its declared
body before the body is read (the bytes, the parsed JSON and the decoded base64 all live at once), then, once
prepared, the decoded image and the prompt it keeps until it is answered. A request that finds no room is
answered 429 at once, before its body is read, so a flood of requests or a few huge ones cannot push the
server's memory past the budget, and a client that respects `Retry-After` gets in a moment later.

`ReadDeadlines`: a client must send a whole request (headers and body) within `read_timeout` of its first byte,
and a connection without a new request is closed after the same time. A per-read socket timeout alone would not
do: a client that sends one byte just before each timeout (slow loris) would hold its thread forever. One
thread watches every connection and cuts the read side of one whose time is up; its handler then answers 408.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from vopd_bench.errors import VopdError

MB = 2**20


@dataclass(frozen=True)
class ServeLimits:
    """The server's bounds; `python -m vopd_bench.serve` sets them from its flags of the same names."""

    max_body_bytes: int = 64 * MB  # --max-body-mb: a larger declared body is refused (413) unread
    max_queue: int = 64  # --max-queue: requests in the server at once; more are refused (429)
    max_queue_bytes: int = 1024 * MB  # --max-queue-mb: memory the requests in the server may hold together
    request_timeout: float = 300.0  # --request-timeout: seconds from a request's headers to its answer (503)
    read_timeout: float = 30.0  # --read-timeout: seconds to send a whole request; also the keep-alive idle limit
    max_connections: int = 256  # --max-connections: open connections; more are answered 503 and closed

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_queue, self.max_queue_bytes, self.max_connections) < 1 or min(
                self.request_timeout, self.read_timeout) <= 0:
            raise VopdError("server limits must be positive")
        if self.max_queue_bytes < 3 * self.max_body_bytes:
            raise VopdError(f"--max-queue-mb ({self.max_queue_bytes / MB:g}) must be at least 3 × --max-body-mb "
                            f"({self.max_body_bytes / MB:g}): a request holds its body about three times while "
                            "it is parsed")


class Admission:
    """A count of requests and the bytes they hold, both capped; `enter` never waits."""

    def __init__(self, slots: int, budget: int):
        self.slots, self.budget = slots, budget
        self.in_use = self.held = 0
        self._lock = threading.Lock()

    def enter(self, nbytes: int) -> Ticket | None:
        """A ticket holding `nbytes`, or None when the server is full (in requests or in bytes)."""
        with self._lock:
            if self.in_use >= self.slots or self.held + nbytes > self.budget:
                return None
            self.in_use += 1
            self.held += nbytes
        return Ticket(self, nbytes)

    def _change(self, ticket: Ticket, nbytes: int) -> bool:
        with self._lock:
            if ticket.released or self.held - ticket.nbytes + nbytes > self.budget:
                return False
            self.held += nbytes - ticket.nbytes
            ticket.nbytes = nbytes
            return True

    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.released:
                ticket.released = True
                self.in_use -= 1
                self.held -= ticket.nbytes


class Ticket:
    """One request's place in the server: released exactly once, whatever happens to the request."""

    def __init__(self, admission: Admission, nbytes: int):
        self._admission, self.nbytes, self.released = admission, nbytes, False
        self.since = time.monotonic()

    def resize(self, nbytes: int) -> bool:
        """Hold `nbytes` instead; False (holding what it held) when the budget cannot take them now."""
        return self._admission._change(self, nbytes)

    def release(self) -> None:
        self._admission._leave(self)


class ReadDeadlines:
    """Cuts the read side of a connection whose request has not fully arrived by its deadline."""

    def __init__(self) -> None:
        self._due: dict[int, tuple[socket.socket, float]] = {}
        self._cut: set[int] = set()
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="vopd-serve-deadlines", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, seconds: float) -> None:
        with self._cond:
            self._cut.discard(id(sock))
            self._due[id(sock)] = (sock, time.monotonic() + seconds)
            self._cond.notify()

    def stop(self, sock: socket.socket) -> bool:
        """Stop watching `sock`; True when its deadline had passed and its read side was cut."""
        with self._cond:
            self._due.pop(id(sock), None)
            return id(sock) in self._cut

    def is_cut(self, sock: socket.socket) -> bool:
        with self._cond:
            return id(sock) in self._cut

    def forget(self, sock: socket.socket) -> None:
        """The connection is closed: drop everything about it (a new socket may reuse its id)."""
        with self._cond:
            self._due.pop(id(sock), None)
            self._cut.discard(id(sock))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for key, (sock, due) in list(self._due.items()):
                    if due <= now:
                        del self._due[key]
                        self._cut.add(key)
                        try:  # a blocked read returns at once with what has arrived; answers can still be sent
                            sock.shutdown(socket.SHUT_RD)
                        except OSError:
                            pass
                nearest = min((due for _, due in self._due.values()), default=None)
                self._cond.wait(None if nearest is None else max(0.0, nearest - now))
