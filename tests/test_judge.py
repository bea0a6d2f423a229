"""The optional LLM judge: its verdict parser, what it sends, what it changes, and its cache."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vopd_bench.judge import Judge, judge_prompt, parse_verdict
from vopd_bench.records import Record

FAST = {"backoff_base": 0.001}


@pytest.mark.parametrize("text, verdict", [
    ("Yes", True), ("yes", True), ("YES", True), ("Yes.", True), ("**Yes**", True), ("Yes!", True),
    ("'yes'", True), ("yes, because both name the red car", True), ("Verdict: Yes", True),
    ("Final answer: no", False), ("No", False), ("no.", False), ("**No**, the colours differ", False),
    ("NO", False), ("<think>the reference says red; the response says red</think>\nYes", True),
    ("reasoning that the template opened</think> No.", False),
    ("The response names the same object.\nYes", True),
    ("  \n yes \n", True),
    # anything that is not a clear Yes or No is undecided, never No
    ("", None), (None, None), ("Maybe", None), ("I think so", None), ("The answer is yes", None),
    ("Yes or no?", None), ("yes/no", None), ("Yes and no", None), ("Nope", None), ("Not sure", None),
    ("Yesterday", None), ("It is correct.\nProbably yes", None), ("<think>yes", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) is verdict


def test_prompt_shows_question_options_reference_and_response():
    prompt = judge_prompt("What colour is the car?", ["red", "blue"], "B", "It is blue.")
    assert "What colour is the car?" in prompt and "(A) red\n(B) blue" in prompt
    assert "Reference answer: B (blue)" in prompt and "It is blue." in prompt
    assert prompt.rstrip().endswith("Yes or No.")
    free = judge_prompt("What is written on the sign?", [], "STOP", "stop")
    assert "Options" not in free and "Reference answer: STOP" in free


class ScriptedJudge:
    """A chat-completions server that answers each prompt by the response it contains."""

    def __init__(self, replies: dict[str, str], fail: frozenset[str] = frozenset()):
        self.replies, self.fail, self.prompts = replies, fail, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                outer.prompts.append(prompt)
                response = prompt.split("Model response:\n", 1)[1].split("\n\nDoes the response", 1)[0]
                if response in outer.fail:
                    status, payload = 500, b'{"error": "down"}'
                else:
                    status = 200
                    payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                   "content": outer.replies[response]}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _rec(key: str, response: str | None, *, parsed=None, correct=False, parse_failed=True, answer="B",
         answer_type="mcq", error=None) -> Record:
    return Record(key=key, benchmark="b", sample_id=key, view="full", question=f"question {key}?",
                  options=["red", "blue"] if answer_type == "mcq" else [], answer=answer, answer_type=answer_type,
                  response=response, parsed=parsed, correct=None if error else correct, parse_failed=parse_failed,
                  error=error)


def _records():
    return [
        _rec("undecided-right", "the second one, blue"),
        _rec("undecided-wrong", "a reddish tone"),
        _rec("decided", "B", parsed="B", correct=True, parse_failed=False),
        _rec("errored", "", parse_failed=False, error="HTTP 500 (gave up after 7 attempts)"),
        _rec("empty", "   "),
        _rec("short-mismatch", "a red sports car", parsed="a red sports car", parse_failed=False, answer="red car",
             answer_type="short"),
        _rec("hedged", "could be red or blue"),
    ]


REPLIES = {"the second one, blue": "Yes.", "a reddish tone": "**No**", "a red sports car": "yes, same object",
           "could be red or blue": "It is hard to say."}


def test_rescore_sends_only_undecided_answers_and_applies_verdicts(tmp_path):
    server = ScriptedJudge(REPLIES)
    judge = Judge(server.url, "judge-model", cache_path=tmp_path / "judge.jsonl", **FAST)
    records = _records()
    before = {r.key: (r.parsed, r.correct, r.parse_failed) for r in records}
    judge.rescore(records)
    judge.close()
    server.close()
    by = {r.key: r for r in records}
    asked = sorted(p.split("Model response:\n")[1].split("\n")[0] for p in server.prompts)
    assert asked == sorted(REPLIES)  # not the decided, errored or empty records
    yes = by["undecided-right"]
    assert (yes.correct, yes.parse_failed, yes.parsed) == (True, False, "judge:yes")
    assert yes.meta["judge"] == {"model": "judge-model", "verdict": "yes", "raw": "Yes."}
    no = by["undecided-wrong"]
    assert (no.correct, no.parse_failed, no.parsed) == (False, False, "judge:no")
    short = by["short-mismatch"]
    assert (short.correct, short.parse_failed, short.parsed) == (True, False, "a red sports car")
    hedged = by["hedged"]  # the judge did not say Yes or No: still a parse failure, not a No
    assert (hedged.correct, hedged.parse_failed, hedged.parsed) == (False, True, None)
    assert hedged.meta["judge"]["verdict"] is None
    for key in ("decided", "errored", "empty"):
        assert (by[key].parsed, by[key].correct, by[key].parse_failed) == before[key] and "judge" not in by[key].meta
    assert judge.stats["asked"] == 4 and judge.stats["yes"] == 2 and judge.stats["undecided"] == 1


@pytest.mark.parametrize("short_mismatches", [True, False])
def test_what_goes_to_the_judge_is_what_the_readme_says(short_mismatches):
    """README: parse failures, and (by default) short answers read but not matched; nothing else."""
    judge = Judge("http://127.0.0.1:9/v1", "j", check_server=False, judge_short_mismatches=short_mismatches)
    try:
        assert judge.needs_judge(_rec("p", "a reddish tone"))
        short = _rec("s", "a red sports car", parsed="a red sports car", parse_failed=False, answer="red car",
                     answer_type="short")
        assert judge.needs_judge(short) is short_mismatches
        right_short = _rec("r", "red car", parsed="red car", correct=True, parse_failed=False, answer="red car",
                           answer_type="short")
        wrong_mcq = _rec("m", "A", parsed="A", parse_failed=False)
        wrong_number = _rec("n", "4", parsed="4", parse_failed=False, answer="3", answer_type="number")
        assert not any(judge.needs_judge(r) for r in (right_short, wrong_mcq, wrong_number))
    finally:
        judge.close()


def test_verdicts_are_cached_on_disk(tmp_path):
    server = ScriptedJudge(REPLIES)
    cache = tmp_path / "judge.jsonl"
    Judge(server.url, "judge-model", cache_path=cache, **FAST).rescore(_records())
    assert len(server.prompts) == 4 and len(cache.read_text().splitlines()) == 4
    with cache.open("a") as f:
        f.write('{"key": "torn')  # an interrupted write must not break the next run
    again = Judge(server.url, "judge-model", cache_path=cache, **FAST)
    records = again.rescore(_records())
    assert len(server.prompts) == 4  # nothing asked twice
    assert again.stats["cached"] == 4 and {r.key: r.correct for r in records}["undecided-right"] is True
    # another judge model is another cache entry
    Judge(server.url, "other-judge", cache_path=cache, **FAST).rescore(_records()[:1])
    assert len(server.prompts) == 5
    server.close()


def test_failed_calls_are_not_cached_and_are_asked_again(tmp_path):
    server = ScriptedJudge(REPLIES, fail=frozenset({"the second one, blue"}))
    judge = Judge(server.url, "judge-model", cache_path=tmp_path / "c.jsonl", max_retries=1, **FAST)
    records = judge.rescore(_records()[:1])
    rec = records[0]
    assert rec.parse_failed and rec.correct is False and rec.meta["judge"]["verdict"] is None
    assert "HTTP 500" in rec.meta["judge"]["error"] and len(server.prompts) == 2  # one try, one retry
    server.fail = frozenset()
    judge.rescore(records)  # the same records, later: the failed one is asked again
    assert rec.correct is True and rec.meta["judge"]["verdict"] == "yes" and len(server.prompts) == 3
    judge.rescore(records)  # already judged: left alone
    assert len(server.prompts) == 3
    server.close()


def test_short_mismatches_can_be_left_to_the_rules(tmp_path):
    server = ScriptedJudge(REPLIES)
    judge = Judge(server.url, "judge-model", judge_short_mismatches=False, **FAST)
    records = judge.rescore(_records())
    assert {r.key: r.correct for r in records}["short-mismatch"] is False and len(server.prompts) == 3
    server.close()


def test_a_wrong_judge_url_or_model_stops_the_run_at_once():
    from vopd_bench.errors import VopdError
    from vopd_bench.serve import SleepBackend, serve_backend

    with serve_backend(SleepBackend(0.0), model_name="judge-a") as server:
        url = server.url
        Judge(url, "judge-a", **FAST).close()
        with pytest.raises(VopdError, match="does not serve 'judge-b'; it serves judge-a"):
            Judge(url, "judge-b", **FAST)
    with pytest.raises(VopdError, match="cannot reach the server"):
        Judge(url, "judge-a", **FAST)
