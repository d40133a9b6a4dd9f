"""The load test, short: a real `lorakit serve` process under concurrent streamed clients.

Fifteen clients send a mix of adapters, blends and base rows for a few seconds; every greedy
answer must equal the reference computed here, independently of the server (transformers'
`generate` on the base with Σ wᵢ · sᵢ BᵢAᵢ merged in by hand, `engine_support.merged_by_hand`),
none may be lost, and the report's counts must add up. A mix whose references are swapped,
and a request for an adapter the server lacks, show that the checks catch wrong and lost
requests (through the module's command line).
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine_support import greedy_reference, merged_by_hand
from lorakit.errors import LoadSpecError, LoadTestError
from lorakit.serve import loadgen
from lorakit.serve.loadgen import Answer, LoadReport, LoadRequest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

API_KEY = "load-key"
START_TIMEOUT = 300  # seconds: two busy cores can make start-up slow
MAX_BATCH_SIZE = 8
LOAD_SECONDS = 4.0
PROMPTS = ["the cat sat", "select name from users", "please answer"]
# None: the base; a name: that adapter; a dict: a blend (sent as model "base").
SPECS: list[str | dict[str, float] | None] = [
    None,
    "sql",
    "polite",
    {"sql": 0.7, "polite": 0.5},
    {"sql": 1.0, "polite": -0.4},
]
# One client per entry of the mix: each client sends at least once, and the clients share one
# cycle over the mix, so every entry is sent however slow the machine. More clients than
# --max-batch-size: some requests wait in the queue.
CLIENTS = len(PROMPTS) * len(SPECS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def load_server(served_folders: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a `lorakit serve` process with the sql and polite adapters."""
    port = _free_port()
    log = tmp_path_factory.mktemp("load") / "serve.log"
    command = [
        sys.executable, "-m", "lorakit", "serve", "--base", str(served_folders.base),
        *(f"--adapter={name}={served_folders.adapter(name)}" for name in served_folders.names),
        "--port", str(port), "--api-key", API_KEY,
        "--max-batch-size", str(MAX_BATCH_SIZE), "--max-queue", "64",
    ]  # fmt: skip
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        loadgen.wait_until_ready(url, START_TIMEOUT, API_KEY, process)
    except LoadTestError as error:
        process.kill()
        pytest.fail(f"{error}:\n{log.read_text()}")
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)


def _blend_of(spec: str | dict[str, float] | None) -> dict[str, float]:
    if spec is None:
        return {}
    return {spec: 1.0} if isinstance(spec, str) else spec


@pytest.fixture(scope="module")
def mix(served_folders: Any) -> list[LoadRequest]:
    """Every (prompt, spec) with its reference text; max_tokens 6, 9 or 12 by prompt."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(served_folders.base)
    base = transformers.AutoModelForCausalLM.from_pretrained(served_folders.base).eval()
    requests = []
    for spec in SPECS:
        folders = {served_folders.adapter(n): w for n, w in _blend_of(spec).items()}
        model = merged_by_hand(base, folders)
        for number, prompt in enumerate(PROMPTS):
            max_tokens = 6 + 3 * number
            ids = tokenizer(prompt)["input_ids"]
            expected = tokenizer.decode(
                greedy_reference(model, ids, max_tokens), skip_special_tokens=True
            )
            requests.append(
                LoadRequest(
                    prompt=prompt,
                    expected=expected,
                    model=spec if isinstance(spec, str) else "base",
                    blend=spec if isinstance(spec, dict) else None,
                    max_tokens=max_tokens,
                )
            )
    return requests


def test_many_clients_get_every_answer_right_and_the_counts_add_up(
    load_server: str, mix: list[LoadRequest]
) -> None:
    # For each prompt (same max_tokens) every spec has its own reference: a server that gave
    # a row another row's adapter or blend would fail the equality check.
    assert len({(r.prompt, r.expected) for r in mix}) == len(mix)
    report = loadgen.run_load_sync(
        load_server, mix, clients=CLIENTS, duration_s=LOAD_SECONDS, api_key=API_KEY, ramp_up_s=1.0
    )
    report.check()
    assert (report.lost, report.wrong) == (0, 0)
    assert report.requests == report.completed == len(report.answers) >= CLIENTS
    assert {a.client for a in report.answers} == set(range(CLIENTS))
    # one shared cycle over the mix: each entry sent as often as any other, within one
    sent = Counter(a.index for a in report.answers)
    assert set(sent) == set(range(len(mix)))
    assert max(sent.values()) - min(sent.values()) <= 1
    labels = Counter(a.label for a in report.answers)
    assert report.requests_per_label == dict(labels)
    assert sum(report.requests_per_label.values()) == report.requests
    assert set(labels) == {
        "base", "sql", "polite", "blend(polite=0.5,sql=0.7)", "blend(polite=-0.4,sql=1)"
    }  # fmt: skip
    # No end-of-sequence token: every completion runs to its max_tokens.
    assert [a.completion_tokens for a in report.answers] == [
        mix[a.index].max_tokens for a in report.answers
    ]
    assert report.completion_tokens == sum(a.completion_tokens for a in report.answers)
    assert report.tokens_per_s == pytest.approx(report.completion_tokens / report.duration_s)
    assert report.requests_per_s == pytest.approx(report.completed / report.duration_s)
    latencies = sorted(a.latency_s for a in report.answers)
    assert report.latency_p50_s == latencies[math.ceil(0.5 * len(latencies)) - 1]
    assert report.latency_p99_s == latencies[math.ceil(0.99 * len(latencies)) - 1]
    for answer in report.answers:
        assert answer.ttft_s is not None and 0 < answer.ttft_s <= answer.latency_s


def test_the_command_line_fails_on_swapped_references_and_unknown_adapters(
    load_server: str, mix: list[LoadRequest], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sql, polite = (next(r for r in mix if r.model == name) for name in ("sql", "polite"))
    lines = [
        {"prompt": sql.prompt, "expected": sql.expected, "model": "sql", "max_tokens": 6},
        # polite's prompt with sql's reference: what a server mixing rows up would return
        {"prompt": polite.prompt, "expected": sql.expected, "model": "polite", "max_tokens": 6},
        {"prompt": "the cat", "expected": "", "model": "missing", "max_tokens": 2},
    ]
    mix_file = tmp_path / "mix.jsonl"
    mix_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["--url", load_server, "--mix", str(mix_file), "--clients", "3", "--duration", "0.5"]
    assert loadgen.main([*argv, "--api-key", API_KEY]) == 1
    out, err = capsys.readouterr()
    sent = int(out.split(" requests,")[0].split()[-1])
    assert sent >= 3
    assert "completed" in out and "requests per model: missing: " in out
    assert re.search(r"wrong polite \(mix #1\): got ", err)
    assert re.search(r"lost missing \(mix #2\): HTTP 404: .*sql", err)
    assert "wrong sql" not in err and "lost sql" not in err
    mix_file.write_text('{"prompt": "the cat", "model": "sql"}\n')
    assert loadgen.main(argv) == 2
    assert "mix.jsonl:1 is not a request" in capsys.readouterr().err


def test_report_counts_lost_and_wrong_answers_and_refuses_bad_mixes() -> None:
    answers = [
        Answer(0, 0, "sql", "a", 4, 0.4, 0.1, None, True),
        Answer(1, 1, "base", "b", 2, 0.2, 0.05, None, False),
        Answer(0, 0, "sql", "", 0, 0.3, None, "HTTP 429: queue full", False),
    ]
    report = LoadReport.from_answers(answers, clients=2, duration_s=2.0)
    assert (report.requests, report.completed, report.lost, report.wrong) == (3, 2, 1, 1)
    assert (report.completion_tokens, report.tokens_per_s, report.requests_per_s) == (6, 3.0, 1.0)
    assert (report.latency_p50_s, report.latency_p99_s) == (0.2, 0.4)  # lost ones excluded
    assert report.requests_per_label == {"base": 1, "sql": 2}
    with pytest.raises(
        LoadTestError, match=r"3 requests, 1 lost, 1 wrong:\nwrong base .*\nlost sql"
    ):
        report.check()
    with pytest.raises(LoadTestError, match="before any request was sent"):
        LoadReport.from_answers([], clients=1, duration_s=1.0).check()
    with pytest.raises(LoadSpecError, match="a blend needs model='base'"):
        LoadRequest("p", "e", model="sql", blend={"polite": 1.0})
    with pytest.raises(LoadSpecError, match="max_tokens must be at least 1; got 0"):
        LoadRequest("p", "e", max_tokens=0)
    with pytest.raises(LoadSpecError, match="the request mix is empty"):
        loadgen.run_load_sync("http://127.0.0.1:1", [])
    with pytest.raises(LoadSpecError, match="clients must be at least 1; got 0"):
        loadgen.run_load_sync("http://127.0.0.1:1", [LoadRequest("p", "e")], clients=0)
    with pytest.raises(LoadSpecError, match=r"less than duration_s \(2.0\); got 2.0"):
        loadgen.run_load_sync(
            "http://127.0.0.1:1", [LoadRequest("p", "e")], duration_s=2.0, ramp_up_s=2.0
        )


def test_a_stream_cut_before_its_end_is_lost() -> None:
    stream = loadgen._StreamState()
    chunk = {"model": "sql", "choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
    stream.read_line("data: " + json.dumps(chunk), 0.01)
    assert (stream.text, stream.ttft_s) == ("hi", 0.01)
    assert stream.incomplete() == "the stream ended without finish_reason, usage, [DONE]"
    stream.read_line('data: {"choices": [], "usage": {}}', 0.02)  # usage without its counts
    assert stream.error is not None
    assert stream.error.startswith("a malformed chunk in the stream (KeyError('completion_tokens')")
