from vopd_bench.records import Record, record_key
from vopd_bench.store import RecordStore


def _rec(key: str, **kw) -> Record:
    return Record(key=key, benchmark="b", sample_id=key, view="full", **kw)


def test_append_and_reload(tmp_path):
    path = tmp_path / "samples.jsonl"
    store = RecordStore(path)
    store.append([_rec("a", correct=True), _rec("b", correct=False)])
    again = RecordStore(path)
    assert list(again.records) == ["a", "b"]
    assert again.records["a"].correct is True and again.done("a") and again.done("b")


def test_torn_last_line_is_cut_and_earlier_records_kept(tmp_path):
    path = tmp_path / "samples.jsonl"
    RecordStore(path).append([_rec("a", correct=True)])
    with path.open("a") as f:
        f.write('{"key": "b", "benchmark": "b", "sample_id": "b", "vi')  # killed mid-write
    store = RecordStore(path)
    assert list(store.records) == ["a"]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 1
    store.append([_rec("c", correct=True)])
    assert list(RecordStore(path).records) == ["a", "c"]


def test_errors_are_not_done_and_retries_are_compacted(tmp_path):
    path = tmp_path / "samples.jsonl"
    store = RecordStore(path)
    store.append([_rec("a", error="timeout", error_kind="backend")])
    assert not store.done("a")
    store.append([_rec("a", correct=True)])
    assert store.done("a")
    assert path.read_text().count("\n") == 2  # appended, not rewritten, while the run goes on
    store.compact()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and '"correct":true' in lines[0]


def test_duplicates_in_file_are_compacted_on_open_last_wins(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(_rec("a", correct=False).to_json() + "\n" + _rec("a", correct=True).to_json() + "\n")
    store = RecordStore(path)
    assert store.records["a"].correct is True
    assert path.read_text().count("\n") == 1


def test_drop_rewrites_without_keys(tmp_path):
    path = tmp_path / "samples.jsonl"
    store = RecordStore(path)
    store.append([_rec("a", correct=True), _rec("b", correct=True)])
    store.drop(["a"])
    assert list(RecordStore(path).records) == ["b"]


def test_key_covers_model_generation_prompt_and_view_config():
    base = dict(model="m", generation={"max_new_tokens": 8}, benchmark="b", sample_id="1", view="crop",
                view_config={"zoom": 2.0}, prompt="q")
    k = record_key(**base)
    assert k == record_key(**base)
    for field, other in [("model", "m2"), ("generation", {"max_new_tokens": 9}), ("prompt", "q2"),
                         ("view_config", {"zoom": 3.0}), ("view", "box"), ("sample_id", "2")]:
        assert record_key(**{**base, field: other}) != k, field
    # The full view does not depend on how crops are drawn.
    full = {**base, "view": "full"}
    assert record_key(**full) == record_key(**{**full, "view_config": {"zoom": 3.0}})
