"""Drives sluice with the official openai Python SDK, as an application would.

Usage: sdk_client.py BASE_URL SCENARIO. Exits 0 and prints "ok" when the scenario behaves as expected;
any failed expectation raises (non-zero exit with a traceback). The SDK's own retries are off
(max_retries=0), so whatever the SDK sees is what sluice delivered.
"""

import sys

import openai

base_url, scenario = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="dummy-client-key", max_retries=0, timeout=60)
messages = [{"role": "user", "content": "hi"}]


def chat():
    reply = client.chat.completions.create(model="deepseek-v4-flash", messages=messages)
    assert reply.choices[0].message.content == "hello from the mock", reply
    assert reply.usage.total_tokens == 5, reply.usage


def stream():
    pieces = []
    for chunk in client.chat.completions.create(model="deepseek-v4-flash", messages=messages, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == "Hello, world", pieces


def stream_error():
    pieces = []
    try:
        for chunk in client.chat.completions.create(model="deepseek-v4-flash", messages=messages, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    except openai.APIError as err:
        assert pieces == ["Hello"], pieces
        assert err.body["type"] == "sluice_upstream_stream_error", err.body
        return
    raise AssertionError(f"a broken stream ended like a success: {pieces}")


def absorbed_429():
    raw = client.chat.completions.with_raw_response.create(model="deepseek-v4-flash", messages=messages)
    reply = raw.parse()
    assert reply.choices[0].message.content == "hello from the mock", reply
    assert raw.headers["x-sluice-attempts"] == "4", raw.headers


def cache_replay():
    """The same deterministic stream twice: a miss, then a hit replayed from the cache, parsed by the SDK
    into exactly the same reasoning, content and usage."""

    def run():
        raw = client.chat.completions.with_raw_response.create(
            model="deepseek-v4-flash",
            messages=messages,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        reasoning, content, usage = [], [], None
        for chunk in raw.parse():
            if chunk.usage:
                usage = chunk.usage.model_dump()
            if chunk.choices:
                delta = chunk.choices[0].delta
                if (delta.model_extra or {}).get("reasoning_content"):
                    reasoning.append(delta.model_extra["reasoning_content"])
                if delta.content:
                    content.append(delta.content)
        return raw.headers["x-sluice-cache"], "".join(reasoning), "".join(content), usage

    first, second = run(), run()
    assert first[0] == "miss" and second[0] == "hit", (first, second)
    assert first[1:] == second[1:], (first, second)
    assert first[1] == "Let me think." and first[2] == "Hello, world", first
    assert first[3]["completion_tokens"] == 9, first


def resumed():
    """A stream cut after 40 of 60 chunks, resumed by sluice: the SDK sees one whole, canonical answer."""
    canonical = "".join(f"w{i} " for i in range(60))
    pieces, ids, usage = [], set(), None
    for chunk in client.chat.completions.create(
        model="deepseek-v4-flash", messages=messages, stream=True, stream_options={"include_usage": True}
    ):
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == canonical, pieces
    assert ids == {"orig"}, ids
    assert usage is not None and usage.completion_tokens == 60, usage


def queued_stream():
    """A stream that waited in sluice's queue: its head came early, keep-alive comments followed (which
    the SDK must not turn into chunks), then the upstream's events."""
    raw = client.chat.completions.with_raw_response.create(model="deepseek-v4-flash", messages=messages, stream=True)
    assert raw.headers["x-sluice-queued"] == "true", raw.headers
    pieces = []
    for chunk in raw.parse():
        assert chunk.choices, chunk
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == "Hello, world", pieces


def queued_stream_error():
    """A stream that waited, then was refused by the upstream (400): the SDK raises with its message."""
    try:
        for _ in client.chat.completions.create(model="deepseek-v4-flash", messages=messages, stream=True):
            pass
    except openai.APIError as err:
        assert err.message == "Invalid max_tokens value", err.message
        assert err.body["status"] == 400 and err.body["type"] == "invalid_request_error", err.body
        return
    raise AssertionError("an upstream 400 after the early head ended like a success")


SCENARIOS = {
    "absorbed_429": absorbed_429,
    "cache_replay": cache_replay,
    "chat": chat,
    "queued_stream": queued_stream,
    "queued_stream_error": queued_stream_error,
    "resumed": resumed,
    "stream": stream,
    "stream_error": stream_error,
}
SCENARIOS[scenario]()
print("ok")
