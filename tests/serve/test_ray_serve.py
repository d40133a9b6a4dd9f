"""The Ray Serve app (`lorakit.serve.ray_app`) on a local Ray instance with two engine replicas.

One Ray instance and one app per module (starting them takes seconds). Greedy answers through
the app are checked against an engine in this process with the same folders; routing by
adapter against the replica id and adapters each answer reports. The pieces that need no
Ray (routing keys, options, the adapters' use counts) are tested on their own first.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lorakit.errors import ServeError, UnknownAdapterError
from lorakit.serve import Engine, SamplingParams
from lorakit.serve.ray_app import RayAppOptions
from lorakit.serve.ray_replica import (
    ADAPTERS_HEADER,
    REPLICA_HEADER,
    STATS_HEADER,
    AdapterLeases,
    adapter_names,
    model_id_of,
)

API_KEY = "ray-key"
PROMPT = "the cat sat"
BLEND = {"sql": 0.7, "polite": 0.5}
ROUTER_CATCH_UP_S = 2.0  # 20 of Ray's pushes of the models each replica holds
WARM_UP_ROUNDS = 30  # requests per adapter at most before each settles on one replica
LONG_TOKENS = 4000  # a stream cut after a few tokens: far from done when its client leaves
PROBES = 400  # short requests at most until the cut stream has left its replica's batch
# Ray's router skips a replica that does not report its queue within this deadline (0.1 s by
# default), and a replica whose engine computes on a busy machine can miss it: routing then
# falls back to any replica. Likewise the router looks for a replica holding the request's
# model for 1-2 s only, then sends it to the replica with the fewest models (seen failing on a
# loaded CI machine: a request for "sql" went to the replica holding "polite"). The routing test
# checks the preference, not those deadlines.
QUEUE_DEADLINE_ENV = {
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "10",
    "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "10",
    "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "30",
}


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_model_id_is_the_adapter_or_the_blends_sorted_adapters() -> None:
    assert model_id_of(_body(model="sql", prompt="x")) == "sql"
    assert model_id_of(_body(model="base", prompt="x")) == ""
    blend = {"blend": {"sql": 0.7, "polite": 0.5}}
    assert model_id_of(_body(model="base", lorakit=blend)) == "polite+sql"
    reordered = {"blend": {"polite": 1.0, "sql": -2.0}}
    assert model_id_of(_body(model="base", lorakit=reordered)) == "polite+sql"
    assert adapter_names("polite+sql") == ("polite", "sql")
    assert adapter_names("") == ()
    # Bodies the app refuses route to any replica, which answers the error.
    for body in (b"not json", b"[1]", _body(model="../etc"), _body(model=7), _body(prompt="x")):
        assert model_id_of(body) == ""


def test_options_parse_serve_run_strings_and_refuse_what_they_do_not_take(
    served_folders: Any,
) -> None:
    folders = {"base": str(served_folders.base), "adapters_root": str(served_folders.adapters_root)}
    options = RayAppOptions.from_args(
        {**folders, "replicas": "3", "cpus_per_replica": "0.5", "load_in_4bit": "true"}
    )
    assert (options.replicas, options.cpus_per_replica, options.load_in_4bit) == (3, 0.5, True)
    assert options.max_adapters_per_replica == 8
    with pytest.raises(ServeError, match=r"does not take \['replica'\]; it takes \["):
        RayAppOptions.from_args({**folders, "replica": "2"})
    with pytest.raises(ServeError, match=r"needs \['adapters_root'\]"):
        RayAppOptions.from_args({"base": folders["base"]})
    with pytest.raises(ServeError, match=r"replicas='two' is not a int"):
        RayAppOptions.from_args({**folders, "replicas": "two"})
    with pytest.raises(ServeError, match=r"max_adapters_per_replica=0 must be 1 or more"):
        RayAppOptions.from_args({**folders, "max_adapters_per_replica": "0"})
    with pytest.raises(ServeError, match=r"dtype='float16' is not served"):
        RayAppOptions.from_args({**folders, "dtype": "float16"})
    with pytest.raises(ServeError, match=r"adapters_root=/nowhere: not a folder"):
        RayAppOptions.from_args({**folders, "adapters_root": "/nowhere"})


def test_an_adapter_stays_loaded_while_anything_uses_it(served_folders: Any) -> None:
    engine = Engine.from_pretrained(served_folders.base)
    leases = AdapterLeases(engine, served_folders.adapters_root)

    async def scenario() -> list[list[str]]:
        seen = []
        await leases.acquire(["sql"])  # Ray's cache entry for "sql"
        await leases.acquire(["polite", "sql"])  # a blend's request: loads polite only
        seen.append(sorted(engine.adapters()))
        await leases.release(["sql"])  # "sql" evicted while the blend still runs
        seen.append(sorted(engine.adapters()))
        await leases.release(["polite", "sql"])  # the blend's request ends
        seen.append(sorted(engine.adapters()))
        with pytest.raises(UnknownAdapterError, match=r"'nope' is not in the adapters root"):
            await leases.acquire(["sql", "nope"])  # checked before anything loads
        seen.append(sorted(engine.adapters()))
        return seen

    assert asyncio.run(scenario()) == [["polite", "sql"], ["polite", "sql"], [], []]
    engine.shutdown()


def test_the_ingress_takes_as_many_requests_at_once_as_the_replicas(served_folders: Any) -> None:
    # Ray lets a deployment take 5 requests at a time unless told otherwise: an ingress left
    # at that would hold every other client back at Ray's proxy, however many replicas run.
    pytest.importorskip("ray.serve")
    from lorakit.serve.ray_app import build_app

    folders = {"base": str(served_folders.base), "adapters_root": str(served_folders.adapters_root)}
    limits = {"replicas": "3", "max_batch_size": "4", "max_queue": "6", "cpus_per_replica": "2"}
    ingress = build_app({**folders, **limits})._bound_deployment  # Ray's bound application
    replicas = ingress._replica_config.init_args[0]._bound_deployment
    assert (ingress.max_ongoing_requests, ingress.num_replicas) == (3 * (4 + 6), 1)
    assert ingress.ray_actor_options["num_cpus"] == 0
    assert (replicas.max_ongoing_requests, replicas.num_replicas) == (4 + 6, 3)
    assert replicas.ray_actor_options["num_cpus"] == 2


# The app on a local Ray instance ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def ray_url(served_folders: Any) -> Iterator[str]:
    """The app with two replicas, each keeping one multiplexed id, at a loopback URL."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from lorakit.serve.ray_app import build_app

    port = _free_port()
    with pytest.MonkeyPatch.context() as environment:  # Ray's processes inherit it
        for name, value in QUEUE_DEADLINE_ENV.items():
            environment.setenv(name, value)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=80 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "base": str(served_folders.base),
                "adapters_root": str(served_folders.adapters_root),
                "replicas": "2",
                "max_adapters_per_replica": "1",
                "cpus_per_replica": "1",
                "api_key": API_KEY,
                "max_batch_size": "4",
                "max_tokens": str(LONG_TOKENS),
            }
        )
        serve.run(app, name="lorakit", route_prefix="/lorakit")  # the app strips the prefix
        yield f"http://127.0.0.1:{port}/lorakit"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(ray_url: str) -> Iterator[Any]:
    httpx = pytest.importorskip("httpx")
    with httpx.Client(
        base_url=ray_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as client:
        yield client


def _complete(http: Any, model: str, max_tokens: int = 6, **extra: Any) -> Any:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    answer = http.post("/v1/completions", json={**body, **extra})
    assert answer.status_code == 200, answer.text
    return answer


def _replica(answer: Any) -> tuple[str, str]:
    return answer.headers[REPLICA_HEADER], answer.headers[ADAPTERS_HEADER]


def test_adapter_requests_land_on_the_replica_that_holds_the_adapter(http: Any) -> None:
    # Each replica keeps one adapter: once "sql" and "polite" sit on different replicas,
    # a request that Ray sent to the other one would evict and reload there, which the
    # adapters each answer reports would show.
    for _ in range(WARM_UP_ROUNDS):
        sql, polite = _replica(_complete(http, "sql", 1)), _replica(_complete(http, "polite", 1))
        if sql[0] != polite[0] and (sql[1], polite[1]) == ("sql", "polite"):
            break
    else:
        pytest.fail(f"adapters did not settle on separate replicas: {sql}, {polite}")
    holders = {"sql": sql[0], "polite": polite[0]}
    # Replicas push the models they hold to the router every 0.1 s: until the last loads
    # arrive there, the router may count a replica as holding nothing and pick either one.
    time.sleep(ROUTER_CATCH_UP_S)
    for _ in range(4):
        for adapter, replica in holders.items():
            assert _replica(_complete(http, adapter, 2)) == (replica, adapter)
    # A blend is a third id: its replica evicts what it held and loads both adapters. The
    # next requests evict again, and each eviction unloads what no id and no request uses.
    assert _replica(_complete(http, "base", 2, lorakit={"blend": BLEND}))[1] == "polite,sql"
    for adapter in ("sql", "polite", "sql"):
        assert _replica(_complete(http, adapter, 2))[1] == adapter


def test_greedy_answers_equal_the_engine_in_this_process(http: Any, served_folders: Any) -> None:
    engine = Engine.from_pretrained(served_folders.base)
    for name in served_folders.names:
        engine.load_adapter(name, served_folders.adapter(name))
    cases: list[tuple[str, Any]] = [("base", None), ("sql", "sql"), ("polite", "polite")]
    cases.append(("base", BLEND))
    expected = engine.generate(
        [PROMPT] * len(cases), [spec for _, spec in cases], SamplingParams(max_tokens=10)
    )
    engine.shutdown()
    answers = []
    for (model, spec), reference in zip(cases, expected, strict=True):
        extra = {"lorakit": {"blend": spec}} if isinstance(spec, dict) else {}
        answer = _complete(http, model, 10, **extra)
        assert answer.json()["choices"][0]["text"] == reference.text, (model, spec)
        answers.append(answer)
    assert len({reference.text for reference in expected}) == len(cases)  # all differ
    assert _replica(answers[-1])[1] == "polite,sql"  # the blend's replica loaded both
    # The same answer streamed, relayed chunk by chunk through the ingress.
    streamed = http.post(
        "/v1/completions",
        json={"model": "sql", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True},
    )
    events = [line[len("data: ") :] for line in streamed.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
    assert text == expected[1].text


def test_routes_the_app_refuses_or_answers_itself(http: Any, ray_url: str) -> None:
    models = http.get("/v1/models").json()
    assert [model["id"] for model in models["data"]] == ["base", "polite", "sql"]
    unknown = http.post("/v1/completions", json={"model": "nope", "prompt": PROMPT})
    assert unknown.status_code == 404
    assert "'nope' is not in the adapters root" in unknown.json()["error"]["message"]
    assert "['polite', 'sql']" in unknown.json()["error"]["message"]
    for method, path in (("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("GET", "/metrics")):
        refused = http.request(method, path)
        assert refused.status_code == 404
        assert "Ray Serve app" in refused.json()["error"]["message"]
    bad = http.post("/v1/completions", json={"model": "sql", "prompt": PROMPT, "n": 2})
    assert bad.status_code == 400  # the replica's app checks the body as `lorakit serve` does
    assert bad.json()["error"]["param"] == "n"
    assert http.get("/health").json() == {"status": "ok", "task": "causal_lm"}
    import httpx

    keyless = httpx.post(ray_url + "/v1/completions", json={"model": "sql", "prompt": PROMPT})
    assert keyless.status_code == 401
    assert keyless.json()["error"]["type"] == "authentication_error"


def test_a_client_that_leaves_mid_stream_ends_its_request_on_the_replica(http: Any) -> None:
    body = {"model": "polite", "prompt": PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
        replica = streamed.headers[REPLICA_HEADER]
        lines = (line for line in streamed.iter_lines() if line.startswith("data: "))
        assert [next(lines) for _ in range(3)]  # three tokens arrived; then the client leaves
    for _ in range(PROBES):  # short requests for the same adapter, until nothing else runs
        probe = _complete(http, "polite", 1)
        stats = json.loads(probe.headers[STATS_HEADER])
        if probe.headers[REPLICA_HEADER] == replica and stats["running"] == 0:
            break
    else:
        pytest.fail(f"the cut stream still runs on replica {replica}: {stats}")
    # Nothing runs there now: the next probe it answers adds exactly its own 2 tokens, and the
    # cut stream generated far fewer than it asked for (it left the batch when cancelled).
    after = next(
        answer
        for answer in (_complete(http, "polite", 2) for _ in range(PROBES))
        if answer.headers[REPLICA_HEADER] == replica
    )
    total = json.loads(after.headers[STATS_HEADER])["tokens_generated_total"]
    assert total == stats["tokens_generated_total"] + 2
    assert total < LONG_TOKENS
