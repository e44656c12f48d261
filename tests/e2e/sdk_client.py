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


{"chat": chat, "stream": stream, "stream_error": stream_error, "absorbed_429": absorbed_429}[scenario]()
print("ok")
