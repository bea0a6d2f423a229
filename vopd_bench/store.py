"""The append-only record store behind samples.jsonl.

Records are appended and fsynced batch by batch, so a run killed at any moment loses at most its in-flight
batch. On open, a torn last line is cut off and records superseded by a later one with the same key are
compacted away, so the file never holds duplicates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from vopd_bench.records import Record


def shard_path(path: str | Path, rank: int) -> Path:
    """The record file of one rank of a torchrun job: samples.jsonl -> samples.rank3.jsonl."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def merge_shards(path: str | Path) -> int:
    """Fold every rank's record file left beside `path` into it, then delete them; returns how many records
    were merged.

    Safe to interrupt at any point: the shards are deleted only after the merged file is fsynced, and merging a
    shard twice changes nothing (one record per key, the later one winning).
    """
    p = Path(path)
    shards = sorted(p.parent.glob(f"{p.stem}.rank*{p.suffix}"))
    if not shards:
        return 0
    store = RecordStore(p)
    n = 0
    for shard in shards:
        records = list(RecordStore(shard).records.values())
        store.append(records)
        n += len(records)
    store.compact()
    for shard in shards:
        shard.unlink()
    return n


class RecordStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, Record] = {}
        self._superseded = 0  # lines in the file that a later line with the same key replaces
        self._open()

    def _open(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        torn = lines[-1] != b""  # a killed write leaves a last line without its newline
        n_lines = 0
        for line in lines[:-1]:  # the last element is b'' or the torn line
            if not line.strip():
                continue
            n_lines += 1
            try:
                rec = Record.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # an unreadable line is dropped by the rewrite below; its work is simply redone
            self.records[rec.key] = rec
        if torn or n_lines != len(self.records):
            self._rewrite(self.records.values())

    def done(self, key: str) -> bool:
        """Done = answered without error. Errored records are retried on every run."""
        rec = self.records.get(key)
        return rec is not None and rec.error is None

    def append(self, records: Iterable[Record]) -> None:
        records = list(records)
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for r in records:
                f.write(r.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            if r.key in self.records:
                del self.records[r.key]  # keep insertion order = file order for the rewrite
                self._superseded += 1
            self.records[r.key] = r

    def compact(self) -> None:
        """Rewrite the file without superseded lines (retried errors), so it holds one record per key."""
        if self._superseded:
            self._rewrite(self.records.values())
            self._superseded = 0

    def drop(self, keys: Iterable[str]) -> None:
        """Forget these keys (for --force), rewriting the file atomically."""
        keys = set(keys)
        if not keys & self.records.keys():
            return
        for k in keys:
            self.records.pop(k, None)
        self._rewrite(self.records.values())

    def _rewrite(self, records: Iterable[Record]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                for r in records:
                    f.write(r.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk: the old file stands, and the half-written copy gives its space back
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)
