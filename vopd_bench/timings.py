"""Where a gap-report run's time went: loading the model, inside the backend, and the harness around it, plus the
throughput of each view. Recorded in run.json and printed as one line at the end of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ViewThroughput:
    """One view's backend work in this run (resumed records are not counted: they cost nothing now)."""

    requests: int = 0
    backend_seconds: float = 0.0
    generated_tokens: int | None = 0  # None once a backend answered without saying how many tokens it generated

    def add(self, seconds: float, tokens: list[int | None]) -> None:
        self.requests += len(tokens)
        self.backend_seconds += seconds
        if self.generated_tokens is not None:
            self.generated_tokens = None if None in tokens else self.generated_tokens + sum(tokens)

    @property
    def requests_per_s(self) -> float | None:
        return self.requests / self.backend_seconds if self.backend_seconds > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        if self.generated_tokens is None or self.backend_seconds <= 0:
            return None
        return self.generated_tokens / self.backend_seconds

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "backend_seconds": self.backend_seconds,
                "generated_tokens": self.generated_tokens, "requests_per_s": self.requests_per_s,
                "tokens_per_s": self.tokens_per_s}


@dataclass
class RunTimings:
    """Seconds of one run. harness = wall − model load − backend: reading data, drawing views, scoring, writing
    records and reports. `ask_seconds` is the ask-and-record loop alone (backend included)."""

    wall_seconds: float = 0.0
    model_load_seconds: float = 0.0
    ask_seconds: float = 0.0
    views: dict[str, ViewThroughput] = field(default_factory=dict)

    @property
    def backend_seconds(self) -> float:
        return sum(v.backend_seconds for v in self.views.values())

    @property
    def harness_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.model_load_seconds - self.backend_seconds)

    def view(self, name: str) -> ViewThroughput:
        return self.views.setdefault(name, ViewThroughput())

    def as_dict(self) -> dict[str, Any]:
        return {"wall_seconds": self.wall_seconds, "model_load_seconds": self.model_load_seconds,
                "backend_seconds": self.backend_seconds, "harness_seconds": self.harness_seconds,
                "run_seconds": self.ask_seconds,
                "views": {name: v.as_dict() for name, v in self.views.items()}}

    def one_line(self) -> str:
        """`time 16.2 s: model load 1.1 s, backend 11.0 s, harness 4.1 s · full 45.8 req/s 92 tok/s · …`"""
        parts = [f"time {self.wall_seconds:.1f} s: model load {self.model_load_seconds:.1f} s, "
                 f"backend {self.backend_seconds:.1f} s, harness {self.harness_seconds:.1f} s"]
        for name, v in self.views.items():
            if v.requests:
                rate = f"{v.requests_per_s:.1f} req/s" if v.requests_per_s is not None else "– req/s"
                tok = f"{v.tokens_per_s:.1f} tok/s" if v.tokens_per_s is not None else "– tok/s"
                parts.append(f"{name} {rate} {tok}")
        if len(parts) == 1:
            parts.append("nothing asked (all answers resumed)")
        return " · ".join(parts)
