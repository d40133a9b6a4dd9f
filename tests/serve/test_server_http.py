"""`lorakit serve` as a real process on loopback, driven by the official openai client and httpx.

One server per test process (it takes seconds to start: torch, transformers, the model). Greedy
answers are checked against the merged model's `generate` (an independent reference) and,
for blends, against the engine in this process; errors against OpenAI's shapes and statuses.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

API_KEY = "test-key"
MAX_TOKENS = 1500  # the server's --max-tokens: long enough that a cut stream is cut mid-way
MAX_PROMPT_TOKENS = 64
START_TIMEOUT = 300  # seconds: two busy cores can make start-up slow
PROMPT = "the cat sat"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """A `lorakit serve` subprocess and what talks to it."""

    def __init__(self, folders: Any, log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "lorakit", "serve", "--base", str(folders.base),
            *(f"--adapter={name}={folders.adapter(name)}" for name in folders.names),
            "--adapters-root", str(folders.adapters_root), "--port", str(self.port),
            "--api-key", API_KEY, "--max-batch-size", "4", "--max-queue", "16",
            "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-tokens", str(MAX_TOKENS),
            *extra,
        ]  # fmt: skip
        self.log = log
        with log.open("w") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        )
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"lorakit serve exited {self.process.returncode}:\n{self.log.read_text()}"
                )
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"lorakit serve not healthy after {START_TIMEOUT} s:\n{self.log.read_text()}")

    def client(self, api_key: str = API_KEY) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        """One sample of /metrics, e.g. 'lorakit_running_requests'."""
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not in /metrics")

    def stop(self) -> int:
        self.http.close()
        if self.process.poll() is None:  # the last test may have stopped it already
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


# Session scope: under pytest-xdist a worker may run other modules between this module's tests,
# and a module fixture would start the server again each time.
@pytest.fixture(scope="session")
def server(
    served_folders: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    running = ServerProcess(served_folders, tmp_path_factory.mktemp("log") / "serve.log")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def reference(served_folders: Any) -> Any:
    """Greedy token ids of the merged model (adapter baked in, plain transformers generate)."""
    import transformers

    from lorakit import PeftModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(served_folders.base)
    merged: dict[str, Any] = {}

    def greedy(adapter: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        key = adapter or "base"
        if key not in merged:
            model = transformers.AutoModelForCausalLM.from_pretrained(served_folders.base)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, served_folders.adapter(adapter))
                model = model.merge_and_unload()
            merged[key] = model.eval()
        with torch.no_grad():
            output = merged[key].generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False
            )
        return [int(token) for token in output[0, len(prompt_ids) :]]

    greedy.tokenizer = tokenizer  # type: ignore[attr-defined]
    return greedy


def test_models_lists_the_base_and_the_adapters(server: ServerProcess) -> None:
    listed = server.client().models.list()
    assert [model.id for model in listed.data] == ["base", "polite", "sql"]
    assert {model.owned_by for model in listed.data} == {"lorakit"}


@pytest.mark.parametrize("adapter", [None, "sql", "polite"])
def test_greedy_completion_equals_the_merged_model(
    server: ServerProcess, reference: Any, adapter: str | None
) -> None:
    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    expected = reference(adapter, prompt_ids, 12)
    answer = server.client().completions.create(
        model=adapter or "base", prompt=PROMPT, max_tokens=12, temperature=0
    )
    assert answer.model == (adapter or "base")
    assert answer.choices[0].text == reference.tokenizer.decode(expected)
    assert answer.choices[0].finish_reason == "length"
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        len(prompt_ids), 12, len(prompt_ids) + 12
    )  # fmt: skip
    by_ids = server.client().completions.create(
        model=adapter or "base", prompt=prompt_ids, max_tokens=12, temperature=0
    )
    assert by_ids.choices[0].text == answer.choices[0].text


def test_adapters_change_the_answer(server: ServerProcess) -> None:
    texts = {
        model: server.client()
        .completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        .choices[0]
        .text
        for model in ["base", "polite", "sql"]
    }
    assert len(set(texts.values())) == len(texts)  # so the equalities above test routing


def test_chat_uses_the_chat_template_and_equals_the_merged_model(
    server: ServerProcess, reference: Any
) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    prompt_ids = reference.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    expected = reference("sql", prompt_ids, 10)
    answer = server.client().chat.completions.create(
        model="sql", messages=messages, max_tokens=10, temperature=0
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == reference.tokenizer.decode(expected)
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == 10


def test_streaming_completion_and_chat_equal_the_whole_answers(server: ServerProcess) -> None:
    client = server.client()
    whole = client.completions.create(model="polite", prompt=PROMPT, max_tokens=9, temperature=0)
    chunks = list(
        client.completions.create(
            model="polite", prompt=PROMPT, max_tokens=9, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(
        model="base", messages=messages, max_tokens=7, temperature=0
    )
    stream = list(
        client.chat.completions.create(
            model="base", messages=messages, max_tokens=7, temperature=0, stream=True
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert content == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"


def test_the_stream_is_server_sent_events_ending_with_done(server: ServerProcess) -> None:
    body = {"model": "sql", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    whole = server.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with server.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks][-1] == "length"


def test_a_blend_in_extra_body_equals_the_engine_in_process(
    server: ServerProcess, served_folders: Any
) -> None:
    from lorakit.serve import Engine, SamplingParams

    blend = {"sql": 0.7, "polite": 0.5}
    answer = server.client().completions.create(
        model="base", prompt=PROMPT, max_tokens=10, temperature=0,
        extra_body={"lorakit": {"blend": blend}},
    )  # fmt: skip
    engine = Engine.from_pretrained(served_folders.base)
    for name in served_folders.names:
        engine.load_adapter(name, served_folders.adapter(name))
    [local, alone] = engine.generate(
        [PROMPT, PROMPT], [blend, "sql"], SamplingParams(max_tokens=10)
    )
    assert answer.choices[0].text == local.text
    assert local.text != alone.text  # the blend is not just one of its adapters


def test_seeded_sampling_repeats_and_stop_strings_end_the_text(server: ServerProcess) -> None:
    client = server.client()
    draws = [
        client.completions.create(
            model="base", prompt=PROMPT, max_tokens=20, temperature=1.0, top_p=0.9, seed=11
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert draws[0] == draws[1]
    greedy = client.completions.create(model="sql", prompt=PROMPT, max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(
        model="sql", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs_come_per_token(server: ServerProcess) -> None:
    answer = server.client().completions.create(
        model="sql", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0
    )
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 5
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == answer.choices[0].text


def test_errors_come_as_openai_errors_and_the_server_keeps_serving(server: ServerProcess) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError, match=r"'nope' is not loaded.*\['polite', 'sql'\]"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=f"over the engine's limit of {MAX_TOKENS}"):
        client.completions.create(model="base", prompt=PROMPT, max_tokens=MAX_TOKENS + 1)
    with pytest.raises(openai.BadRequestError, match=f"limit of {MAX_PROMPT_TOKENS}"):
        client.completions.create(model="base", prompt=[5] * (MAX_PROMPT_TOKENS + 1), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n=3 is not implemented"):
        client.completions.create(model="base", prompt=PROMPT, n=3)
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        server.client(api_key="wrong").models.list()
    malformed = server.http.post(
        "/v1/chat/completions",
        content=b'{"model": "base", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in malformed.json()["error"]["message"]
    assert server.http.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert server.http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert (
        server.http.post("/v1/classifications", json={"model": "base", "input": "x"}).status_code
        == 400
    )
    ok = client.completions.create(model="base", prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_adapters_load_from_the_root_and_unload(server: ServerProcess) -> None:
    http = server.http
    loaded = http.post("/v1/adapters", json={"name": "polite2", "path": "polite"})
    assert loaded.status_code == 200, loaded.text
    assert (loaded.json()["id"], loaded.json()["r"], loaded.json()["lora_alpha"]) == (
        "polite2",
        2,
        4,
    )
    assert "polite2" in [item["id"] for item in http.get("/v1/adapters").json()["data"]]
    client = server.client()
    same = [
        client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
        .choices[0]
        .text
        for name in ("polite", "polite2")
    ]
    assert same[0] == same[1]
    again = http.post("/v1/adapters", json={"name": "polite2", "path": "polite"})
    assert again.status_code == 409 and "loaded already" in again.json()["error"]["message"]
    escape = http.post("/v1/adapters", json={"name": "x", "path": "../base"})
    assert escape.status_code == 400 and "'..' is not allowed" in escape.json()["error"]["message"]
    assert http.delete("/v1/adapters/polite2").json() == {
        "id": "polite2", "object": "adapter", "deleted": True
    }  # fmt: skip
    assert "polite2" not in [model.id for model in client.models.list().data]
    with pytest.raises(openai.NotFoundError, match="'polite2' is not loaded"):
        client.completions.create(model="polite2", prompt=PROMPT, max_tokens=2)
    assert http.delete("/v1/adapters/polite2").status_code == 404


def test_metrics_count_requests_tokens_and_adapters(server: ServerProcess) -> None:
    before = server.metric('lorakit_adapter_requests_total{adapter="polite"}')
    tokens = server.metric("lorakit_generated_tokens_total")
    server.client().completions.create(model="polite", prompt=PROMPT, max_tokens=4, temperature=0)
    assert server.metric("lorakit_generated_tokens_per_second") > 0  # since the last scrape
    assert server.metric("lorakit_generated_tokens_per_second") == 0  # none since
    assert server.metric('lorakit_adapter_requests_total{adapter="polite"}') == before + 1
    assert server.metric("lorakit_generated_tokens_total") == tokens + 4
    assert server.metric("lorakit_running_requests") == 0
    assert server.metric("lorakit_queue_depth") == 0
    assert server.metric('lorakit_http_requests_total{route="/v1/completions",status="200"}') >= 1
    assert server.metric("lorakit_loaded_adapters") == 2


def test_a_client_that_disconnects_mid_stream_is_dropped(server: ServerProcess) -> None:
    tokens = server.metric("lorakit_generated_tokens_total")
    body = {
        "model": "sql",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generation runs
    # The connection is closed; the engine drops the sequence at its next step.
    deadline = time.monotonic() + 120
    while server.metric("lorakit_running_requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("lorakit_running_requests") == 0
    assert server.metric("lorakit_queue_depth") == 0
    assert server.metric("lorakit_generated_tokens_total") - tokens < MAX_TOKENS
    ok = server.client().completions.create(model="sql", prompt=PROMPT, max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_the_openai_example_of_the_docs_runs(server: ServerProcess) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    [example] = re.findall(r"```python title=client.py\n(.*?)```", text, flags=re.DOTALL)
    assert 'base_url="http://127.0.0.1:8000/v1", api_key="KEY"' in example
    example = example.replace("http://127.0.0.1:8000", server.url).replace('"KEY"', repr(API_KEY))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "docs/serving.md", "exec"), {"__name__": "docs"})
    client = server.client()
    sql = client.completions.create(model="sql", prompt=PROMPT, max_tokens=16, temperature=0)
    blend = {"lorakit": {"blend": {"sql": 0.7, "polite": 0.5}}}
    blended = client.completions.create(
        model="base", prompt=PROMPT, max_tokens=16, temperature=0, extra_body=blend
    )
    assert printed.getvalue().startswith(f"{sql.choices[0].text} 16\n")
    assert printed.getvalue().endswith(f"{blended.choices[0].text}\n")


# Last in this module: it stops the server. A worker of pytest-xdist runs the tests it gets in
# collection order, so none of this module's tests comes after it on the same worker.
def test_sigterm_finishes_the_running_stream_then_exits(server: ServerProcess) -> None:
    body = {
        "model": "polite",
        "prompt": PROMPT,
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(lines)
        server.process.send_signal(signal.SIGTERM)
        refused, deadline = False, time.monotonic() + 60
        while not refused and time.monotonic() < deadline:  # new connections are refused
            try:
                httpx.get(server.url + "/health", timeout=5)
                time.sleep(0.01)
            except httpx.TransportError:
                refused = True
        assert refused
        rest = [line for line in lines if line]
    events = [first, *rest]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(timeout=120) == -signal.SIGTERM  # uvicorn re-raises the signal
    log = server.log.read_text()
    assert "Shutting down" in log and "Traceback" not in log
