"""The server's request checks and response shapes (lorakit.serve.openai_api), without HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from lorakit.serve.http_errors import RequestFieldError, error_payload
from lorakit.serve.http_generation import chat_logprobs, completion_logprobs
from lorakit.serve.openai_api import (
    fit_default_max_tokens,
    parse_chat,
    parse_completion,
    parse_json,
)
from lorakit.serve.types import SamplingParams, TokenEvent


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": "base", "prompt": "hello", **fields}


def test_openai_defaults_and_every_sampling_field_reach_sampling_params() -> None:
    plain = parse_completion(_completion())
    assert plain.sampling == SamplingParams(temperature=1.0, max_tokens=16)
    assert (plain.adapter, plain.stream, plain.include_usage) == (None, False, False)
    full = parse_completion(
        _completion(
            model="sql",
            temperature=0,
            top_p=0.5,
            top_k=7,
            seed=3,
            max_tokens=9,
            stop=["\n", "END"],
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
            n=1,
            presence_penalty=0.0,
            echo=False,
        )
    )
    assert full.sampling == SamplingParams(
        temperature=0.0, top_p=0.5, top_k=7, seed=3, max_tokens=9, stop=("\n", "END"), logprobs=True
    )
    assert (full.adapter, full.stream, full.include_usage) == ("sql", True, True)
    assert parse_completion(_completion(stop="###")).sampling.stop == ("###",)
    assert parse_completion(_completion(prompt=[5, 6, 7])).prompt == [5, 6, 7]
    assert parse_completion(_completion(prompt=["one prompt"])).prompt == "one prompt"


def test_a_blend_goes_in_the_lorakit_field_with_model_base() -> None:
    parsed = parse_completion(_completion(lorakit={"blend": {"sql": 0.7, "polite": 1}}))
    assert parsed.adapter == {"sql": 0.7, "polite": 1.0}
    with pytest.raises(RequestFieldError, match="a blend applies to the base: send model 'base'"):
        parse_completion(_completion(model="sql", lorakit={"blend": {"sql": 1.0}}))
    for bad in ({"blend": {}}, {"blend": {"sql": "x"}}, {"mix": {"sql": 1}}, [1]):
        with pytest.raises(RequestFieldError, match=r'lorakit must be \{"blend"'):
            parse_completion(_completion(lorakit=bad))


def test_chat_messages_text_parts_and_max_tokens_defaults() -> None:
    body = {
        "model": "base",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
            },
        ],
    }
    parsed = parse_chat(body, default_max_tokens=77)
    assert parsed.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    assert parsed.sampling.max_tokens == 77 and parsed.sampling.logprobs is False
    limited = parse_chat({**body, "max_completion_tokens": 5, "logprobs": True}, 77)
    assert limited.sampling.max_tokens == 5 and limited.sampling.logprobs is True
    with pytest.raises(RequestFieldError, match=r"messages\[0\] needs role in"):
        parse_chat({**body, "messages": [{"role": "robot", "content": "x"}]}, 77)
    with pytest.raises(RequestFieldError, match=r"messages\[0\] must be an object with role"):
        parse_chat({**body, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 77)
    with pytest.raises(RequestFieldError, match="messages must be a non-empty list"):
        parse_chat({**body, "messages": []}, 77)


def test_a_chat_without_max_tokens_gets_what_the_positions_leave() -> None:
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    default = parse_chat(body, default_max_tokens=1024)
    assert not default.has_max_tokens
    assert fit_default_max_tokens(default, 2000, 2048).sampling.max_tokens == 48
    assert fit_default_max_tokens(default, 100, 2048).sampling.max_tokens == 1024
    assert fit_default_max_tokens(default, 2000, None).sampling.max_tokens == 1024
    given = parse_chat({**body, "max_tokens": 500}, default_max_tokens=1024)
    assert fit_default_max_tokens(given, 2000, 2048).sampling.max_tokens == 500  # theirs


@pytest.mark.parametrize(
    ("fields", "message", "param"),
    [
        ({"temperature": 2.5}, r"temperature must be a number in \[0, 2\], got 2.5", "temperature"),
        ({"temperature": True}, "temperature must be a number", "temperature"),
        ({"top_p": 0}, r"top_p must be a number in \(?\[", "top_p"),
        ({"max_tokens": 0}, "max_tokens must be 1 or more, got 0", "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens must be 1 or more, got 2.0", "max_tokens"),
        ({"top_k": -1}, r"top_k must be 0 \(no limit\) or more", "top_k"),
        ({"seed": "7"}, 'seed must be an integer, got "7"', "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4", "stop"),
        ({"stop": [""]}, "stop must be a non-empty string", "stop"),
        ({"logprobs": 2}, r"logprobs must be 0 \(the chosen tokens' logprobs\), got 2", "logprobs"),
        ({"n": 2}, r"n=2 is not implemented by this server; leave it out or send 1", "n"),
        ({"presence_penalty": 0.5}, "presence_penalty=0.5 is not implemented", "presence_penalty"),
        ({"echo": True}, "echo=True is not implemented", "echo"),
        ({"logit_bias": {"5": 1}}, "logit_bias=", "logit_bias"),
        ({"suffix": "x"}, r"does not take the field\(s\) \['suffix'\]", "suffix"),
        ({"stream_options": {"include_usage": True}}, 'with "stream": true', "stream_options"),
        ({"prompt": ["a", "b"]}, "one prompt per request", "prompt"),
        ({"prompt": ""}, "prompt must be a non-empty string", "prompt"),
        ({"prompt": [1, "2"]}, "prompt must be a non-empty string or list of token ids", "prompt"),
        ({"model": 5}, "model must name an adapter, or 'base' for the base; got 5", "model"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(fields: dict[str, Any], message: str, param: str) -> None:
    with pytest.raises(RequestFieldError, match=message) as raised:
        parse_completion(_completion(**fields))
    status, body = error_payload(raised.value)
    assert status == 400
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_a_json_object_is_refused() -> None:
    assert parse_json(b'{"a": 1}') == {"a": 1}
    with pytest.raises(RequestFieldError, match="the request body is not valid JSON"):
        parse_json(b'{"model": "base",')
    with pytest.raises(RequestFieldError, match="must be a JSON object, got list"):
        parse_json(b"[1, 2]")
    with pytest.raises(RequestFieldError, match="not valid JSON"):
        parse_json(b"\xff\xfe")


def test_logprobs_objects_carry_each_token_text_offset_and_bytes() -> None:
    events = [
        TokenEvent(5, "Hi", -0.5),
        TokenEvent(6, " é", -1.25),
        TokenEvent(7, "", -2.0, "length"),
    ]
    assert completion_logprobs(events, offset=3) == {
        "tokens": ["Hi", " é", ""],
        "token_logprobs": [-0.5, -1.25, -2.0],
        "top_logprobs": None,
        "text_offset": [3, 5, 7],
    }
    chat = chat_logprobs([*events, TokenEvent(-1, "", None, "cancelled")])
    assert [entry["token"] for entry in chat["content"]] == ["Hi", " é", ""]
    assert chat["content"][1]["bytes"] == list(" é".encode())
