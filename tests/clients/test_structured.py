"""Structured output and tool choice through the official Python clients, against a running
`wick serve` (tests/integration/api_clients.rs starts it with SmolLM2 as `smollm2:135m` and
Qwen2.5-coder as the tools model).

The round trips the issue names: openai's `chat.completions.parse(response_format=Model)`
and ollama's `format=Model.model_json_schema()` must parse into the model every time, at
temperature 0 and at 1.
"""

import json
import os
from typing import Annotated, List, Literal

import httpx
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "smollm2:135m"
TOOLS_MODEL = os.environ["WICK_TEST_TOOLS_MODEL"]
HOST = os.environ["OLLAMA_HOST"]


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: Literal["cat", "dog", "rabbit", "parrot"]
    age: int = Field(ge=0, le=30)
    toys: List[Annotated[str, Field(max_length=20)]] = Field(max_length=3)


class Country(BaseModel):
    name: str = Field(max_length=30)
    capital: str = Field(max_length=30)
    # An integer: a JSON number's fraction has no length bound in the schema, and a small
    # model sampled at temperature 1 can write digits until the token limit.
    population_millions: int = Field(ge=0, le=2000)
    continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]


ASK_PET = [
    {"role": "system", "content": "You answer with JSON only."},
    {"role": "user", "content": "Describe a pet: its name, species, age and toys."},
]
ASK_COUNTRY = [{"role": "user", "content": "Tell me about France as JSON."}]

# (temperature, seed): greedy, and sampled with several seeds.
SETTINGS = [(0.0, 1), (1.0, 1), (1.0, 2), (1.0, 3)]


@pytest.mark.parametrize("temperature,seed", SETTINGS)
def test_openai_parse_into_pydantic(oai, temperature, seed):
    for model, messages in ((Pet, ASK_PET), (Country, ASK_COUNTRY)):
        r = oai.chat.completions.parse(
            model=MODEL,
            messages=messages,
            response_format=model,
            temperature=temperature,
            seed=seed,
            max_tokens=300,
        )
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, model), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("temperature,seed", SETTINGS)
def test_ollama_format_from_pydantic(client, temperature, seed):
    for model, messages in ((Pet, ASK_PET), (Country, ASK_COUNTRY)):
        r = client.chat(
            model=MODEL,
            messages=messages,
            format=model.model_json_schema(),
            options={"temperature": temperature, "seed": seed, "num_predict": 300},
        )
        model.model_validate_json(r.message.content)
        assert r.done_reason == "stop"


def test_ollama_format_streamed_and_json_mode(client):
    parts = list(
        client.generate(
            model=MODEL,
            prompt="A pet as JSON.",
            format=Pet.model_json_schema(),
            stream=True,
            options={"temperature": 0, "num_predict": 300},
        )
    )
    Pet.model_validate_json("".join(p.response for p in parts))
    r = client.generate(
        model=MODEL,
        prompt='Answer {"ok": true} as JSON.',
        format="json",
        options={"temperature": 0, "num_predict": 200},
    )
    assert isinstance(json.loads(r.response), dict)


def test_vllm_fields_through_extra_body(oai):
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is water wet?"}],
        temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert r.choices[0].message.content in ("yes", "no")
    r = oai.completions.create(
        model=MODEL,
        prompt="A phone number: ",
        temperature=0,
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": r"\+[0-9]{2} [0-9]{3} [0-9]{4}"}},
    )
    text = r.choices[0].text
    assert len(text) == 12 and text[0] == "+" and text[3] == " " and text[7] == " ", text


def test_bad_schema_is_a_clear_400(oai, client):
    bad = {"type": "object", "properties": {"x": {"type": "string", "format": "isbn"}}}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model=MODEL,
            messages=ASK_PET,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )
    assert "isbn" in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=ASK_PET, format=bad)
    assert e.value.status_code == 400 and "isbn" in str(e.value)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}


def test_openai_tool_choice_required_streamed(oai):
    stream = oai.chat.completions.create(
        model=TOOLS_MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    calls, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert calls and finish == "tool_calls"
    args = json.loads(calls[0].function.arguments)
    assert calls[0].function.name == "get_weather"
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")


def test_ollama_named_tool_choice():
    # ollama-python has no tool_choice argument (Ollama ignores the field); the body goes
    # through httpx and the answer is read with the client's own response type.
    body = {
        "model": TOOLS_MODEL,
        "messages": [{"role": "user", "content": "Tell me a joke."}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stream": False,
        "options": {"temperature": 0, "num_predict": 80},
    }
    r = ollama.ChatResponse.model_validate(
        httpx.post(f"http://{HOST}/api/chat", json=body, timeout=300).json()
    )
    assert r.message.tool_calls, r.message
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.function.arguments["unit"] in ("celsius", "fahrenheit")
