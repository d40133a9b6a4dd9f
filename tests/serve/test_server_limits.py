"""The server in this process (uvicorn in a thread) around a real engine with chosen limits.

Here the test reads the engine's own state: a full queue (429), a plain request whose client
leaves (cancelled), the refusals of a server without an API key or adapters root, and a
sequence-classification base on /v1/classifications.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

LONG = 4000  # tokens: a request that is still running while the test does its steps
PROMPT = "the cat sat"
SCORE_TOL = 1e-5  # fp32 softmax of the same logits, the adapter applied unmerged vs merged


@contextmanager
def serving(engine: Any, **options: Any) -> Iterator[str]:
    """Serve `engine` on a free loopback port from a thread; yields the base URL."""
    from lorakit.serve.server import ServerOptions, create_app

    app = create_app(engine, ServerOptions(port=0, **options))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=120)


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.01)


def _engine(served_folders: Any, **limits: Any) -> Any:
    from lorakit.serve import Engine

    engine = Engine.from_pretrained(served_folders.base, max_new_tokens=LONG, **limits)
    engine.load_adapter("sql", served_folders.adapter("sql"))
    return engine


def test_a_full_queue_is_a_429_with_retry_after(served_folders: Any) -> None:
    engine = _engine(served_folders, max_batch_size=1, max_queue=1)
    long = {"model": "sql", "prompt": PROMPT, "max_tokens": LONG, "stream": True}
    short = {"model": "base", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    with serving(engine) as url, httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: dropping the iterator closes the connection
            assert next(lines).startswith("data: ")  # the request fills the batch of 1
            waiting: dict[str, Any] = {}
            thread = threading.Thread(
                target=lambda: waiting.update(answer=http.post("/v1/completions", json=short))
            )
            thread.start()
            _wait_for(lambda: engine.stats()["queue_depth"] == 1, "the second request to wait")
            full = http.post("/v1/completions", json=short)
            assert full.status_code == 429
            assert full.headers["Retry-After"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"
            assert "queue holds 1 waiting requests" in full.json()["error"]["message"]
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.RateLimitError, match="max_queue"):
                client.completions.create(**short)
            assert engine.stats()["running"] == 1  # the stream was running all along
        # The stream was closed: its request is cancelled and the waiting one runs.
        thread.join(timeout=120)
        assert waiting["answer"].status_code == 200
        assert waiting["answer"].json()["usage"]["completion_tokens"] == 2
        _wait_for(lambda: engine.stats()["running"] == 0, "the batch to empty")
        assert engine.stats()["tokens_generated_total"] < LONG


def test_a_plain_request_whose_client_leaves_is_cancelled(served_folders: Any) -> None:
    engine = _engine(served_folders)
    body = {"model": "sql", "prompt": PROMPT, "max_tokens": LONG}
    with serving(engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(120, read=1))
        _wait_for(lambda: engine.stats()["running"] == 0, "the request to be dropped")
        assert engine.stats()["queue_depth"] == 0
        assert engine.stats()["tokens_generated_total"] < LONG


def test_without_an_api_key_management_is_refused_and_generation_is_open(
    served_folders: Any,
) -> None:
    engine = _engine(served_folders)
    with serving(engine, adapters_root=served_folders.adapters_root) as url:
        for method, path, body in [
            ("GET", "/v1/adapters", None),
            ("POST", "/v1/adapters", {"name": "p", "path": "polite"}),
            ("DELETE", "/v1/adapters/sql", None),
        ]:
            answer = httpx.request(method, url + path, json=body, timeout=120)
            assert answer.status_code == 403
            assert answer.json()["error"]["type"] == "permission_error"
            assert "needs an API key: start the server with --api-key" in answer.text
        assert sorted(engine.adapters()) == ["sql"]  # nothing loaded or unloaded
        client = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
        answer = client.completions.create(model="sql", prompt=PROMPT, max_tokens=3)
        assert answer.usage.completion_tokens == 3


def test_without_an_adapters_root_loading_is_refused(served_folders: Any) -> None:
    engine = _engine(served_folders)
    with serving(engine, api_key="k") as url:
        headers = {"Authorization": "Bearer k"}
        load = {"name": "p", "path": "polite"}
        answer = httpx.post(url + "/v1/adapters", json=load, headers=headers, timeout=120)
        assert answer.status_code == 403
        assert "start the server with --adapters-root DIR" in answer.json()["error"]["message"]
        assert httpx.post(url + "/v1/adapters", json=load, timeout=120).status_code == 401
        listed = httpx.get(url + "/v1/adapters", headers=headers, timeout=120).json()
        assert [item["id"] for item in listed["data"]] == ["sql"]
        assert listed["data"][0]["r"] == 4 and listed["data"][0]["task"] == "causal_lm"


def test_an_unexpected_error_is_a_500_without_details_and_serving_goes_on(
    served_folders: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(served_folders)

    def broken() -> dict[str, Any]:  # no request reaches an engine bug on purpose
        raise RuntimeError("secret detail")

    with serving(engine) as url:
        monkeypatch.setattr(engine, "adapters", broken)
        answer = httpx.get(url + "/v1/models", timeout=120)
        assert answer.status_code == 500
        assert answer.json()["error"]["type"] == "server_error"
        assert "secret detail" not in answer.text
        monkeypatch.undo()
        assert httpx.get(url + "/v1/models", timeout=120).json()["data"][1]["id"] == "sql"


@pytest.fixture(scope="module")
def classifier_folders(
    tmp_path_factory: pytest.TempPathFactory, serve_tokenizer: Any
) -> tuple[Path, Path]:
    """A tiny BERT classifier with the serving tokenizer, and a LoRA adapter with its head."""
    import transformers

    from lorakit import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("classifier")
    tokenizer = serve_tokenizer
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, num_labels=3, pad_token_id=0,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(root / "base")
    lora = LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False
    )
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "classifier" in name and parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))  # a trained head differs
    model.save_pretrained(root / "sentiment")
    return root / "base", root / "sentiment"


def test_classifications_equal_the_adapter_merged_classifier(
    classifier_folders: tuple[Path, Path],
) -> None:
    import transformers

    from lorakit import PeftModel
    from lorakit.serve import Engine

    base, adapter = classifier_folders
    texts = ["the cat sat on the mat", "thank you"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        logits = merged(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    expected = torch.softmax(logits, dim=-1)
    engine = Engine.from_pretrained(base)
    engine.load_adapter("sentiment", adapter)
    with serving(engine) as url:
        body = {"model": "sentiment", "input": texts}
        answer = httpx.post(url + "/v1/classifications", json=body, timeout=120).json()
        assert answer["model"] == "sentiment"
        labels = ["negative", "neutral", "positive"]
        for row, item in zip(expected, answer["data"], strict=True):
            assert item["label"] == labels[int(row.argmax())]
            scores = torch.tensor([item["scores"][label] for label in labels])
            torch.testing.assert_close(scores, row, atol=SCORE_TOL, rtol=0)
        base_answer = httpx.post(
            url + "/v1/classifications", json={"model": "base", "input": "thank you"}, timeout=120
        ).json()
        assert base_answer["data"][0]["scores"] != answer["data"][1]["scores"]
        refused = httpx.post(
            url + "/v1/completions", json={"model": "base", "prompt": "x"}, timeout=120
        )
        assert refused.status_code == 400
        assert "use POST /v1/classifications" in refused.json()["error"]["message"]
        unknown = httpx.post(
            url + "/v1/classifications", json={"model": "nope", "input": "x"}, timeout=120
        )
        assert unknown.status_code == 404 and "['sentiment']" in unknown.text
