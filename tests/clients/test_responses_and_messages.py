"""OpenAI's Responses API and Anthropic's Messages API through their official clients
(`openai`: `client.responses.create/stream/parse`; `anthropic`: `client.messages.create/
stream/count_tokens`), against a running `wick serve` (tests/integration/api_clients.rs:
SmolLM2 as `smollm2:135m`, Qwen2.5-coder as the tools model).
"""

import json
import os
from typing import Literal

import anthropic
import httpx
import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "smollm2:135m"
TOOLS_MODEL = os.environ["WICK_TEST_TOOLS_MODEL"]
HOST = os.environ["OLLAMA_HOST"]
QUESTION = "What is the capital of Germany?"


# The anthropic client no longer has sampling arguments; the server reads `temperature`
# from the body as the Messages API defines it.
GREEDY = {"temperature": 0}


# --- /v1/responses -----------------------------------------------------------------------


def test_responses_create(oai):
    r = oai.responses.create(
        model=MODEL,
        instructions="You are a geography teacher.",
        input=QUESTION,
        temperature=0,
        max_output_tokens=40,
    )
    assert r.status == "completed"
    assert "Berlin" in r.output_text
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_responses_stream_in_the_official_order(oai):
    with oai.responses.stream(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        temperature=0,
        max_output_tokens=40,
    ) as stream:
        kinds, deltas = [], ""
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas += event.delta
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "Berlin" in deltas and deltas == final.output_text


def test_responses_length_is_incomplete(oai):
    # Greedy: a sampled answer can end within five tokens.
    r = oai.responses.create(model=MODEL, input="Count to one hundred.", max_output_tokens=5,
                             temperature=0)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"


class City(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)
    kind: Literal["capital", "port", "village"]


def test_responses_parse_text_format(oai):
    for temperature in (0, 1):
        r = oai.responses.parse(
            model=MODEL,
            input="Describe Berlin as JSON.",
            text_format=City,
            temperature=temperature,
            max_output_tokens=200,
        )
        assert isinstance(r.output_parsed, City), r.output_text


FUNCTION = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    },
}


def test_responses_function_calls_and_their_output(oai):
    ask = [{"role": "user", "content": "What is the weather like in Tokyo right now?"}]
    r = oai.responses.create(model=TOOLS_MODEL, input=ask, tools=[FUNCTION], temperature=0,
                             max_output_tokens=80)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather", r.output
    assert "Tokyo" in json.loads(calls[0].arguments)["city"]
    follow = ask + [
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id,
         "output": '{"temperature_c": 31, "sky": "sunny"}'},
    ]
    r = oai.responses.create(model=TOOLS_MODEL, input=follow, tools=[FUNCTION], temperature=0,
                             max_output_tokens=60)
    assert "31" in r.output_text or "sunny" in r.output_text.lower(), r.output_text


def test_responses_forced_call_streamed(oai):
    with oai.responses.stream(
        model=TOOLS_MODEL,
        input="Say hello.",
        tools=[FUNCTION],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=80,
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    calls = [o for o in final.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert set(json.loads(calls[0].arguments)) == {"city"}


# --- /v1/messages ------------------------------------------------------------------------


def test_messages_create(claude):
    m = claude.messages.create(
        model=MODEL,
        max_tokens=40,
        system="You are a geography teacher.",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body=GREEDY,
    )
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and "Berlin" in m.content[0].text
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0
    n = claude.messages.count_tokens(
        model=MODEL,
        system="You are a geography teacher.",
        messages=[{"role": "user", "content": QUESTION}],
    )
    assert n.input_tokens == m.usage.input_tokens


def test_messages_stream(claude):
    with claude.messages.stream(
        model=MODEL,
        max_tokens=40,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        extra_body=GREEDY,
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Berlin" in text and final.content[0].text == text
    assert final.stop_reason == "end_turn"


def test_messages_stop_reasons(claude):
    m = claude.messages.create(model=MODEL, max_tokens=3, extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Count to twenty."}])
    assert m.stop_reason == "max_tokens"
    m = claude.messages.create(model=MODEL, max_tokens=60, extra_body=GREEDY,
                               stop_sequences=["3"],
                               messages=[{"role": "user", "content": "Count from 1 to 10."}])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "3", m
    assert "3" not in m.content[0].text


def test_messages_errors_in_anthropic_shape(claude):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="nosuch:1b", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=5,
                               messages=[{"role": "system", "content": "hi"}])
    assert e.value.body["type"] == "error"


TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    },
}


def test_messages_tool_use_and_result(claude):
    ask = [{"role": "user", "content": "What is the weather like in Tokyo right now?"}]
    m = claude.messages.create(model=TOOLS_MODEL, max_tokens=80, extra_body=GREEDY,
                               tools=[TOOL], messages=ask)
    assert m.stop_reason == "tool_use", m
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather" and "Tokyo" in use.input["city"]
    follow = ask + [
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": '{"temperature_c": 31, "sky": "sunny"}'}]},
    ]
    m = claude.messages.create(model=TOOLS_MODEL, max_tokens=60, extra_body=GREEDY,
                               tools=[TOOL], messages=follow)
    text = "".join(b.text for b in m.content if b.type == "text")
    assert "31" in text or "sunny" in text.lower(), m


def test_messages_forced_tool_streamed(claude):
    with claude.messages.stream(
        model=TOOLS_MODEL,
        max_tokens=80,
        extra_body=GREEDY,
        tools=[TOOL],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "Say hello."}],
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) >= 1 and uses[0].name == "get_weather"
    assert set(uses[0].input) == {"city"}
    assert final.stop_reason == "tool_use"


# --- logprobs (tests/clients/test_logprobs.py has the reported values) -------------------


def test_saying_no_to_logprobs_is_fine(oai):
    r = oai.chat.completions.create(model=MODEL, max_tokens=2, logprobs=False,
                                    messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None
    assert r.choices[0].logprobs is None
