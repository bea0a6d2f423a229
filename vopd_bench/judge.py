"""An optional LLM judge for the answers the rules could not decide.

Only two kinds of record go to the judge:
- parse failures: the rules found no answer in the response (`parse_failed`, no error);
- free-form ("short") answers the rules read but could not match exactly: string equality after normalising
  cannot tell "a red car" from "red", so a mismatch there is not a decision (switch off with
  `judge_short_mismatches=False`).
Everything the rules decided stays as they decided it. Without a judge, undecided answers stay parse failures:
wrong, and counted as such, never guessed.

The judge sees the question (with its options), the reference answer and the response, and must reply Yes or
No. Its reply is read tolerantly ("Yes.", "**yes**", "No, because…"), and anything else leaves the record
undecided rather than counting as No. Replies are cached on disk by a hash of the question, reference,
response, judge model and prompt version, so a rerun or a second report asks nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vopd_bench.records import Record

PROMPT_VERSION = 1

_PROMPT = """You are checking a model's answer to a question about an image. You cannot see the image, and you \
do not need to: decide only whether the model's response states the same final answer as the reference answer. \
Wording, letter versus option text, and extra explanation do not matter; a different, missing or hedged answer \
does.

Question:
{question}
{options}
Reference answer: {answer}

Model response:
{response}

Does the response give the same answer as the reference? Reply with one word: Yes or No."""

_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_LABEL = re.compile(r"^(?:final\s+)?(?:answer|verdict|judgement|judgment|decision)\s*[:\-]\s*", re.IGNORECASE)
_WORD = re.compile(r"^(yes|no)\b(.*)$", re.IGNORECASE | re.DOTALL)
_AMBIGUOUS = re.compile(r"^\s*(?:/|or\b|and\b)", re.IGNORECASE)  # "yes or no", "yes/no", "yes and no"


def parse_verdict(text: str | None) -> bool | None:
    """True for Yes, False for No, None for anything else (undecided, never read as No).

    Accepts case, punctuation and emphasis ("Yes.", "**YES**", "'no'"), a leading label ("Verdict: yes"), a
    reason after the word ("No, the colour differs"), a reasoning block before it, and a verdict alone on the
    last line after some explanation.
    """
    if not text:
        return None
    text = _THINK.sub(" ", text)
    if "</think>" in text.lower():  # the template opened the block: the verdict follows the last close
        text = text[text.lower().rfind("</think>") + len("</think>"):]
    lines = [ln for ln in (_clean(line) for line in text.splitlines()) if ln]
    if not lines:
        return None
    first = _read(lines[0], allow_reason=True)
    if first is not None:
        return first
    return _read(lines[-1], allow_reason=False) if len(lines) > 1 else None


def _clean(line: str) -> str:
    line = re.sub(r"[*_`#>\"'“”‘’\[\]()]+", "", line).strip()
    return _LABEL.sub("", line).strip()


def _read(line: str, *, allow_reason: bool) -> bool | None:
    m = _WORD.match(line)
    if m is None:
        return None
    rest = m.group(2)
    if _AMBIGUOUS.match(rest):
        return None
    if not allow_reason and rest.strip(" .!"):
        return None
    return m.group(1).lower() == "yes"


def judge_prompt(question: str, options: Sequence[str], answer: str, response: str) -> str:
    """The judge's prompt. MCQ references are shown as the letter and the option it names."""
    opts = "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(options))
    ref = answer
    letter = answer.strip("()[] .").upper()
    if options and len(letter) == 1 and "A" <= letter <= chr(64 + len(options)):
        ref = f"{letter} ({options[ord(letter) - 65]})"
    return _PROMPT.format(question=question.strip(), options=("Options:\n" + opts) if opts else "", answer=ref,
                          response=response.strip())


def cache_key(question: str, options: Sequence[str], answer: str, response: str, model: str) -> str:
    payload = json.dumps([PROMPT_VERSION, model, question, list(options), answer, response], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class JudgeResult:
    verdict: bool | None  # None: the judge's reply was not a Yes/No, or the call failed
    raw: str | None = None  # the judge's reply
    error: str | None = None  # the call failed (not cached; the next rescore asks again)
    cached: bool = False


class Judge:
    """Rescore undecided records with an LLM behind an OpenAI-compatible server.

    `rescore(records)` is the one call the runner needs; `judge_many` works on raw (question, options,
    reference, response) tuples.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 cache_path: str | Path | None = None, concurrency: int = 16, timeout: float = 120.0,
                 max_retries: int = 4, max_tokens: int = 512, backoff_base: float = 0.5,
                 judge_short_mismatches: bool = True, check_server: bool = True):
        from vopd_bench.backends.openai import ChatClient

        self.model = model
        self.max_tokens = max_tokens
        self.judge_short_mismatches = judge_short_mismatches
        self.client = ChatClient(base_url, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                                 max_retries=max_retries, backoff_base=backoff_base)
        if check_server:  # a wrong URL or judge name stops the run now, not after every call has failed
            try:
                self.client.served_model(model)
            except BaseException:
                self.client.close()
                raise
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()  # asked, cached, yes, no, undecided, failed
        if self.cache_path is not None and self.cache_path.is_file():
            self._load_cache()

    def _load_cache(self) -> None:
        assert self.cache_path is not None
        for line in self.cache_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                self._cache[row["key"]] = row["raw"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from an interrupted run: that verdict is simply asked again

    def _remember(self, rows: list[tuple[str, str]]) -> None:
        with self._lock:
            for key, raw in rows:
                self._cache[key] = raw
            if self.cache_path is not None and rows:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as f:
                    for key, raw in rows:
                        f.write(json.dumps({"key": key, "model": self.model, "raw": raw}, ensure_ascii=False) + "\n")

    def needs_judge(self, rec: Record) -> bool:
        """Undecided by the rules, answered, not already judged."""
        if rec.error is not None or not (rec.response or "").strip() or rec.answer is None:
            return False
        if (rec.meta.get("judge") or {}).get("verdict") in ("yes", "no"):
            return False
        if rec.parse_failed:
            return True
        return self.judge_short_mismatches and rec.answer_type == "short" and rec.correct is False

    def judge_many(self, items: Sequence[tuple[str, Sequence[str], str, str]]) -> list[JudgeResult]:
        """Verdicts for (question, options, reference answer, response) tuples; cached ones are not asked,
        and identical ones are asked once."""
        keys = [cache_key(q, o, a, r, self.model) for q, o, a, r in items]
        todo = {k: items[i] for i, k in enumerate(keys) if k not in self._cache}
        failed: dict[str, str] = {}
        if todo:
            bodies = [{"model": self.model, "messages": [{"role": "user", "content": judge_prompt(*item)}],
                       "temperature": 0.0, "max_tokens": self.max_tokens} for item in todo.values()]
            results = self.client.complete(bodies)
            self.stats["asked"] += len(bodies)
            self._remember([(k, res.text) for k, res in zip(todo, results, strict=True) if res.text is not None])
            failed = {k: res.error for k, res in zip(todo, results, strict=True) if res.error is not None}
        out = []
        for k in keys:
            if k in failed:
                out.append(JudgeResult(None, error=failed[k]))
            else:
                raw = self._cache[k]
                out.append(JudgeResult(parse_verdict(raw), raw=raw, cached=k not in todo))
        for r in out:
            self.stats["failed" if r.error else "undecided" if r.verdict is None else "yes" if r.verdict else "no"] += 1
        self.stats["cached"] += sum(r.cached for r in out)
        return out

    def rescore(self, records: Sequence[Record]) -> Sequence[Record]:
        """Judge the undecided records among `records`, in place; returns `records`.

        A Yes or No decides the record: `correct` follows it and `parse_failed` clears; `parsed` becomes
        "judge:yes"/"judge:no" where the rules had read nothing. Every judged record gets `meta["judge"]`
        ({"model", "verdict": "yes"|"no"|None, "raw" or "error"}); an undecided or failed one keeps its rule
        score, and a failed call is asked again by the next rescore.
        """
        todo = [r for r in records if self.needs_judge(r)]
        if not todo:
            return records
        results = self.judge_many([(r.question or r.prompt or "", r.options, str(r.answer), r.response or "")
                                   for r in todo])
        for rec, res in zip(todo, results, strict=True):
            verdict = None if res.verdict is None else ("yes" if res.verdict else "no")
            info: dict[str, Any] = {"model": self.model, "verdict": verdict}
            info.update({"error": res.error} if res.error else {"raw": res.raw})
            rec.meta = {**rec.meta, "judge": info}
            if verdict is None:
                continue
            rec.correct = res.verdict
            if rec.parsed is None:
                rec.parsed = f"judge:{verdict}"
            rec.parse_failed = False
        return records

    def close(self) -> None:
        self.client.close()


__all__ = ["Judge", "JudgeResult", "parse_verdict", "judge_prompt", "cache_key", "PROMPT_VERSION"]
