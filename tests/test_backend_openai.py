"""The `openai` backend against a real HTTP server on loopback that serves a tiny model through the `hf` backend.

The model is `lively_model_dir` (conftest): its answers depend on both the image and the prompt, so identical
answers through HTTP mean the server saw the same pixels and text.
"""

import json
import threading

import pytest
from PIL import Image, ImageDraw

from vopd_bench.backends import get_backend
from vopd_bench.backends.base import GenerationConfig, Request
from vopd_bench.backends.hf import HFBackend
from vopd_bench.backends.openai import (
    ChatClient,
    OpenAIBackend,
    _Malformed,
    chat_body,
    completion_text,
    normalize_base_url,
)
from vopd_bench.errors import VopdError
from vopd_bench.serve import FaultConfig, SleepBackend, parse_chat_request, serve_backend

GEN = GenerationConfig(max_new_tokens=5)
FAST = {"backoff_base": 0.005, "backoff_max": 0.05}  # retries in tests: milliseconds, not seconds


def _image(i: int) -> Image.Image:
    im = Image.new("RGB", (96 + 8 * i, 80), (37 * i % 256, 200, 90))
    ImageDraw.Draw(im).ellipse((10 + i, 10, 40 + 3 * i, 50), fill=(250, 29 * i % 256, 20))
    return im


REQUESTS = [Request(str(i), _image(i), p) for i, p in enumerate(
    ["What colour is the circle?", "What shape is it?\n(A) round\n(B) square", "Answer yes or no.",
     "Describe the image.", "What colour is the circle?", "Answer with the option's letter."])]


@pytest.fixture(scope="module")
def hf_backend(lively_model_dir):
    return HFBackend(str(lively_model_dir), batch_size=8)


@pytest.fixture(scope="module")
def expected(hf_backend):
    responses = hf_backend.generate(REQUESTS, GEN)
    texts = [r.text for r in responses]
    assert all(r.error is None for r in responses)
    assert len(set(texts)) >= 4, texts  # the answers depend on the input, so agreement below means something
    return texts


def test_hf_batched_answers_equal_unbatched(hf_backend, expected):
    """Six prompts of different lengths with images of different sizes, padded into one batch, get the greedy
    answers each gets alone."""
    assert hf_backend.preferred_batch_size >= len(REQUESTS)  # `expected` was one batch
    assert [hf_backend.generate([r], GEN)[0].text for r in REQUESTS] == expected


def test_concurrency_bounds_the_requests_in_flight():
    """`--concurrency 3`: three requests in flight together, never a fourth. The server holds each request at a
    barrier of three, so the bound is reached whatever the timing, and a client that sent fewer would break the
    barrier. A client that sent more is seen above the bound when its extra requests reach the server before a
    wave is released (most runs, not every one: nothing but a wait could prove that no fourth is coming)."""
    concurrency, total = 3, 9
    lock = threading.Lock()
    in_flight = peak = 0
    barrier = threading.Barrier(concurrency, timeout=60)

    class Gate(SleepBackend):
        def generate(self, requests, gen):
            nonlocal in_flight, peak
            with lock:
                in_flight += len(requests)
                peak = max(peak, in_flight)
            try:
                barrier.wait()
                return super().generate(requests, gen)
            finally:
                with lock:  # before the answer is sent, so the client's next request cannot overlap this one
                    in_flight -= len(requests)

    # one request per backend call, and more workers than the bound, so the server never queues
    with serve_backend(Gate(0.0), max_batch=1, workers=2 * concurrency) as server:
        client = OpenAIBackend("sleep", base_url=server.url, concurrency=concurrency, **FAST)
        requests = [Request(str(i), _image(i % 6), f"question {i}") for i in range(total)]
        got = client.generate(requests, GEN)
        client.close()
        assert server.stats.answered == total
    assert all(r.error is None for r in got)
    assert peak == concurrency


def test_answers_equal_the_hf_backend(hf_backend, expected):
    # A batch closes when it holds max_batch requests (an event), not when a short window happens to catch two.
    with serve_backend(hf_backend, model_name="tiny", max_batch=2, window_s=10.0) as server:
        client = OpenAIBackend("tiny", base_url=server.url, concurrency=4, timeout=30, **FAST)
        try:
            got = client.generate(REQUESTS, GEN)
        finally:
            client.close()
        assert [r.error for r in got] == [None] * len(REQUESTS)
        assert [r.text for r in got] == expected
        assert server.stats.answered == len(REQUESTS) and not server.stats.faults
        # requests in flight together were answered as batches
        assert max(server.dispatcher.batch_sizes) == 2


class EveryFaultOnce(FaultConfig):
    """Each request meets every kind of fault once, in turn, before it is answered."""

    def draw(self, body, nth):
        return ("429", "500", "timeout", "garbage", "garbage", "garbage")[nth] if nth < 6 else None


def test_answers_equal_the_hf_backend_despite_faults(hf_backend, expected):
    with serve_backend(hf_backend, model_name="tiny", faults=EveryFaultOnce(timeout_sleep=0.2)) as server:
        client = OpenAIBackend("tiny", base_url=server.url, concurrency=4, timeout=30, max_retries=6, **FAST)
        try:
            got = client.generate(REQUESTS, GEN)
        finally:
            client.close()
        assert [r.text for r in got] == expected and all(r.error is None for r in got)
        n = len(REQUESTS)
        assert server.stats.faults == {"429": n, "500": n, "timeout": n, "garbage": 3 * n}
        assert server.stats.answered == n


def test_client_timeout_is_retried():
    """A server that stalls longer than the client waits: the client gives up on that attempt and retries."""
    backend = SleepBackend(0.0)
    reqs = [Request(str(i), _image(i), f"question {i}") for i in range(12)]
    # A stalled attempt never answers (the server drops it after 10 minutes), so the run can only finish
    # because the client cut each stalled attempt at its own timeout and retried.
    with serve_backend(backend, faults=FaultConfig(rate_timeout=0.4, timeout_sleep=600.0, seed=0), workers=4) as server:
        client = OpenAIBackend("sleep", base_url=server.url, concurrency=12, timeout=0.5, max_retries=10, **FAST)
        got: list = []
        worker = threading.Thread(target=lambda: got.extend(client.generate(reqs, GEN)), daemon=True)
        worker.start()
        worker.join(timeout=300)  # a generous bound on an event: done, or the attempts were never cut
        assert not worker.is_alive(), "the client waited for a stalled server instead of timing out"
        client.close()
        assert server.stats.faults["timeout"] >= 3
    assert [r.text for r in got] == [r.text for r in backend.generate(reqs, GEN)]


def test_permanent_failure_becomes_an_error_response_and_the_rest_succeed():
    backend = SleepBackend(0.0)
    bad = Request("bad", _image(1), "this one always fails")
    reqs = [Request("a", _image(0), "fine"), bad, Request("c", _image(2), "also fine")]

    class AlwaysFailOne(FaultConfig):
        def draw(self, body, nth):  # 500 for every attempt of the one request that mentions "always fails"
            return "500" if b"always fails" in body else None

    with serve_backend(backend, faults=AlwaysFailOne()) as server:
        client = OpenAIBackend("sleep", base_url=server.url, max_retries=3, timeout=5, **FAST)
        got = client.generate(reqs, GEN)
        client.close()
        assert server.stats.faults["500"] == 4  # the first try and three retries
    assert got[0].error is None and got[2].error is None and got[0].text and got[2].text
    assert got[1].text == "" and "HTTP 500" in got[1].error and "gave up after 4 attempts" in got[1].error


def test_client_errors_are_not_retried():
    with serve_backend(SleepBackend(0.0), model_name="served") as server:
        client = ChatClient(server.url, max_retries=5, **FAST)
        body = {"model": "served", "messages": [{"role": "user", "content": "no image here"}], "max_tokens": 3}
        [res] = client.complete([body])
        client.close()
        assert res.text is None and res.error.startswith("HTTP 400") and res.attempts == 1
        assert server.stats.rejected[400] == 1


def test_api_key_goes_in_the_header_only(hf_backend, monkeypatch):
    secret = "sk-test-5e3c1a9b77"
    monkeypatch.setenv("VOPD_TEST_KEY", secret)
    with serve_backend(hf_backend, model_name="tiny", api_key=secret) as server:
        client = OpenAIBackend("tiny", base_url=server.url, api_key_env="VOPD_TEST_KEY", timeout=30, **FAST)
        got = client.generate(REQUESTS[:2], GEN)
        assert all(r.error is None for r in got)
        # one GET /models when the backend starts, one POST per request: each carries the key
        assert dict(server.stats.authorizations) == {"bearer": 3}
        assert secret not in client.fingerprint() and secret not in repr(got)
        client.close()
        # without the key, the server's 401 stops the run before any request
        monkeypatch.delenv("VOPD_TEST_KEY")
        with pytest.raises(VopdError, match=r"HTTP 401 \(is \$VOPD_TEST_KEY set\?\)"):
            OpenAIBackend("tiny", base_url=server.url, api_key_env="VOPD_TEST_KEY", **FAST)


def test_fingerprint_names_served_model_and_weights_not_the_url(hf_backend):
    with serve_backend(hf_backend, model_name="tiny") as server:
        client = OpenAIBackend("ignored-when-model-name-is-given", base_url=server.url + "/", model_name="tiny")
        assert client.fingerprint() == f"openai:tiny:{hf_backend.fingerprint()}"
        assert str(server.port) not in client.fingerprint()
        client.close()


def test_restarted_server_on_another_port_resumes_and_another_model_does_not(tmp_path, monkeypatch):
    """The resume key names the served model, not the URL: the same model behind a new port answers nothing
    again; other weights under the same name (another `root`) redo every record."""
    from vopd_bench import runner
    from vopd_bench.runner import GapReportConfig, run_gap_report

    monkeypatch.setattr(runner, "write_outputs", lambda *a, **k: None)  # only the records matter

    def run(backend: SleepBackend) -> tuple[int, int, list]:
        with serve_backend(backend, model_name="served") as server:
            result = run_gap_report(GapReportConfig(
                model="served", limit=2, quiet=True, out=str(tmp_path), backend="openai",
                backend_options={"base_url": server.url, "concurrency": 2, **FAST}))
            return server.port, server.stats.requests, result.records

    port1, asked1, first = run(SleepBackend(0.0))
    port2, asked2, second = run(SleepBackend(0.0))
    assert port1 != port2 and asked1 == len(first) == 6 and asked2 == 0
    assert [r.key for r in second] == [r.key for r in first]
    _, asked3, third = run(SleepBackend(0.0, seconds_per_item=1e-9))  # other weights: another fingerprint
    assert asked3 == 6 and {r.model for r in third} == {"openai:served:sleep:0:1e-09"}


def test_unreachable_server_and_unknown_model_are_one_line_errors():
    with serve_backend(SleepBackend(0.0), model_name="served") as server:
        url = server.url
        with pytest.raises(VopdError, match=r"does not serve 'other'; it serves served"):
            OpenAIBackend("other", base_url=url, **FAST)
    with pytest.raises(VopdError, match=r"cannot reach the server at http://127\.0\.0\.1:\d+/v1") as e:
        OpenAIBackend("served", base_url=url, **FAST)
    assert "\n" not in str(e.value)
    with pytest.raises(VopdError, match="must be an http"):
        OpenAIBackend("x", base_url="localhost:8000")


def test_request_body_layout_and_generation_settings():
    gen = GenerationConfig(max_new_tokens=7, temperature=0.0, seed=5, chat_template_kwargs={"enable_thinking": False})
    body = chat_body("m", REQUESTS[0], gen)
    [message] = body["messages"]
    assert message["role"] == "user" and [p["type"] for p in message["content"]] == ["image_url", "text"]
    assert message["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert message["content"][1]["text"] == REQUESTS[0].prompt
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (7, 0.0, 5)
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "chat_template_kwargs" not in chat_body("m", REQUESTS[0], GEN)  # absent unless asked for
    # the server reads back the same pixels, text and settings
    request, parsed_gen = parse_chat_request(json.loads(json.dumps(body)), "m")
    assert request.prompt == REQUESTS[0].prompt and parsed_gen == gen
    assert request.image.tobytes() == REQUESTS[0].image.tobytes() and request.image.size == REQUESTS[0].image.size


def test_chat_template_kwargs_reach_the_backend():
    seen = []

    class Recorder(SleepBackend):
        def generate(self, requests, gen):
            seen.append(gen)
            return super().generate(requests, gen)

    with serve_backend(Recorder(0.0)) as server:
        client = OpenAIBackend("sleep", base_url=server.url, **FAST)
        gen = GenerationConfig(max_new_tokens=9, seed=3, chat_template_kwargs={"enable_thinking": False})
        client.generate(REQUESTS[:1], gen)
        client.close()
    assert seen == [gen]


@pytest.mark.parametrize("payload, text", [
    (b'{"choices": [{"message": {"role": "assistant", "content": "  B \\n"}}]}', "B"),
    (b'{"choices": [{"message": {"role": "assistant", "content": null}}]}', ""),
    (b'{"choices": [{"message": {"content": [{"type": "text", "text": "A"}]}}]}', "A"),
])
def test_completion_text_reads_chat_completions(payload, text):
    assert completion_text(payload) == text


@pytest.mark.parametrize("payload", [b"<html>502</html>", b'{"object": "error"}', b'{"choices": []}',
                                     b'{"choices": [{"message": {"role": "assis', b'{"choices": [{"message": 3}]}'])
def test_completion_text_rejects_what_is_not_a_chat_completion(payload):
    with pytest.raises(_Malformed):
        completion_text(payload)


def test_base_url_normalisation():
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert normalize_base_url("https://api.example.com/api/v1") == "https://api.example.com/api/v1"


def test_registry_builds_it_with_runner_options_and_batches_wide():
    with serve_backend(SleepBackend(0.0), model_name="served") as server:
        backend = get_backend("openai", "served", base_url=server.url, trust_remote_code=False, batch_size=16,
                              concurrency=8, **FAST)
        assert backend.preferred_batch_size == 32  # 4 waves of 8: the concurrency stays busy across a batch
        backend.close()


def test_fault_draws_are_deterministic_and_at_the_configured_rates():
    faults = FaultConfig(rate_429=0.1, rate_500=0.2, rate_timeout=0.05, rate_garbage=0.15, seed=7)
    draws = [faults.draw(f"body {i}".encode(), 0) for i in range(4000)]
    assert draws == [faults.draw(f"body {i}".encode(), 0) for i in range(4000)]
    assert draws != [FaultConfig(0.1, 0.2, 0.05, 0.15, seed=8).draw(f"body {i}".encode(), 0) for i in range(4000)]
    for kind, rate in (("429", 0.1), ("500", 0.2), ("timeout", 0.05), ("garbage", 0.15), (None, 0.5)):
        assert abs(draws.count(kind) / 4000 - rate) < 0.03, kind
    # a retry of the same body is a fresh draw
    assert {faults.draw(b"same", n) for n in range(50)} > {None}
    with pytest.raises(VopdError):
        FaultConfig(rate_429=0.6, rate_500=0.5)


def test_gap_report_through_the_server_equals_hf_with_faults_and_a_key(lively_model_dir, hf_backend, tmp_path,
                                                                       monkeypatch):
    """`gap-report --backend openai` against the loopback server gives the `hf` backend's records, even when a
    third of the attempts fail; the API key never reaches the outputs."""
    from vopd_bench import runner
    from vopd_bench.runner import GapReportConfig, run_gap_report

    common = dict(model=str(lively_model_dir), limit=3, max_new_tokens=4, quiet=True)
    with monkeypatch.context() as m:
        m.setattr(runner, "write_outputs", lambda *a, **k: None)  # only its records matter: skip the plots
        hf = run_gap_report(GapReportConfig(**common, out=str(tmp_path / "hf")), backend=hf_backend)
    secret = "sk-test-0d94f1c2aa"
    monkeypatch.setenv("VOPD_TEST_KEY", secret)
    faults = FaultConfig(rate_429=0.15, rate_500=0.15, rate_timeout=0.1, rate_garbage=0.15, timeout_sleep=0.2, seed=2)
    with serve_backend(hf_backend, faults=faults, api_key=secret) as server:
        options = {"base_url": server.url, "api_key_env": "VOPD_TEST_KEY", "concurrency": 4, "timeout": 30,
                   "max_retries": 12, **FAST}
        api = run_gap_report(GapReportConfig(**common, out=str(tmp_path / "api"), backend="openai",
                                             backend_options=options))
        assert sum(server.stats.faults.values()) > 0

    def table(result):
        return {(r.benchmark, r.sample_id, r.view): (r.response, r.parsed, r.correct, r.error) for r in result.records}

    assert len(hf.records) == 9 and table(api) == table(hf)
    assert api.records[0].model == f"openai:{lively_model_dir}:{hf_backend.fingerprint()}"
    for path in (tmp_path / "api").iterdir():
        if path.suffix in (".json", ".jsonl", ".md", ".csv", ".html"):
            assert secret not in path.read_text(encoding="utf-8"), path.name
