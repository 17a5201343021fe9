"""Token log-probabilities through the official clients, in the four shapes clients read:
Ollama's (`/api/chat`, `/api/generate`), OpenAI chat's (`choices[0].logprobs.content`), text
completions' (`tokens`/`token_logprobs`/`top_logprobs`/`text_offset`) and the Responses
API's (`output_text.logprobs`), streamed and not, against SmolLM2 as `smollm2:135m`.

The values themselves are checked against the decoder's own logits in
tests/integration/model_reference.rs; here: every token has an entry, the entries spell the
answer, greedy answers pick their best alternative, and streamed and whole answers agree.
"""

import math
import os

import httpx
import ollama
import openai
import pytest

HOST = os.environ["OLLAMA_HOST"]

MODEL = "smollm2:135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 24}


def spell(entries):
    """The text the entries' tokens make: their bytes where the client keeps them (ollama's
    types drop `bytes`), else their token strings."""
    if all("bytes" in e for e in entries):
        return b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace")
    return "".join(e["token"] for e in entries)


def check_entries(entries, text, top):
    """Entries in the shared shape: they spell `text`, alternatives best first."""
    assert entries, "no logprobs"
    assert spell(entries) == text
    for e in entries:
        assert e["logprob"] <= 0
        alts = e["top_logprobs"]
        assert len(alts) == top
        values = [a["logprob"] for a in alts]
        assert values == sorted(values, reverse=True)
        # The chosen token is one of the alternatives or less likely than all of them.
        assert e["token"] in [a["token"] for a in alts] or e["logprob"] <= values[-1] + 1e-6
        assert sum(math.exp(v) for v in values) <= 1 + 1e-4


def greedy_picks_best(entries):
    for e in entries:
        assert math.isclose(e["logprob"], e["top_logprobs"][0]["logprob"], abs_tol=1e-6)


def test_ollama_chat_logprobs_streamed_and_whole(client):
    ask = dict(model=MODEL, messages=QUESTION, options=GREEDY, logprobs=True, top_logprobs=3)
    whole = client.chat(**ask)
    entries = [lp.model_dump() for lp in whole.logprobs]
    check_entries(entries, whole.message.content, 3)
    greedy_picks_best(entries)
    # One entry per generated token (the end-of-turn token is not part of the answer).
    assert len(entries) == whole.eval_count

    streamed, text = [], ""
    for part in client.chat(**ask, stream=True):
        text += part.message.content
        streamed += [lp.model_dump() for lp in part.logprobs or []]
    assert text == whole.message.content
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]
    for a, b in zip(streamed, entries):
        assert math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4)


def test_ollama_generate_logprobs_without_alternatives(client):
    r = client.generate(model=MODEL, prompt="Count: one, two,", options=GREEDY, logprobs=True)
    entries = [lp.model_dump() for lp in r.logprobs]
    assert entries
    assert spell(entries) == r.response
    assert all(not e.get("top_logprobs") for e in entries)
    # On the wire each entry also carries the token's bytes, as Ollama sends them.
    raw = httpx.post(
        f"http://{HOST}/api/generate",
        json={"model": MODEL, "prompt": "Count: one, two,", "options": GREEDY,
              "logprobs": True, "stream": False},
        timeout=60,
    ).json()
    assert b"".join(bytes(e["bytes"]) for e in raw["logprobs"]).decode() == raw["response"]


def test_ollama_without_logprobs_sends_none(client):
    r = client.chat(model=MODEL, messages=QUESTION, options=GREEDY)
    assert r.logprobs is None


def test_openai_chat_logprobs(oai):
    ask = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, logprobs=True,
               top_logprobs=4)
    r = oai.chat.completions.create(**ask)
    choice = r.choices[0]
    entries = [c.model_dump() for c in choice.logprobs.content]
    check_entries(entries, choice.message.content, 4)
    greedy_picks_best(entries)

    streamed, text = [], ""
    for chunk in oai.chat.completions.create(**ask, stream=True):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        text += c.delta.content or ""
        if c.logprobs and c.logprobs.content:
            streamed += [e.model_dump() for e in c.logprobs.content]
    assert text == choice.message.content
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]


def test_openai_chat_sampled_logprobs_are_the_models_not_the_samplers(oai):
    # top_k 1 would make the sampler's own distribution certain (logprob 0); the report is
    # the model's distribution, so the chosen tokens are not all at 0.
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        temperature=1,
        seed=7,
        max_tokens=24,
        logprobs=True,
        extra_body={"top_k": 1},
    )
    entries = [c.model_dump() for c in r.choices[0].logprobs.content]
    assert any(e["logprob"] < -1e-3 for e in entries)
    assert all(e["top_logprobs"] == [] for e in entries)


def test_openai_completions_logprobs(oai):
    ask = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=12,
               logprobs=2)
    r = oai.completions.create(**ask)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == c.text
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2
        assert math.isclose(max(top.values()), value, abs_tol=1e-6)

    tokens, offsets = [], []
    for chunk in oai.completions.create(**ask, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == lp.tokens
    assert offsets == lp.text_offset


def test_responses_logprobs(oai):
    ask = dict(model=MODEL, input="What is the capital of France?", temperature=0,
               max_output_tokens=24, include=["message.output_text.logprobs"], top_logprobs=2)
    r = oai.responses.create(**ask)
    part = r.output[-1].content[0]
    entries = [e.model_dump() for e in part.logprobs]
    check_entries(entries, part.text, 2)

    deltas, final = [], None
    with oai.responses.stream(**ask) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas += [e.model_dump() for e in event.logprobs]
            # A 135M model may run to max_output_tokens: `incomplete` ends the stream then.
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert [e["token"] for e in deltas] == [e["token"] for e in entries]
    assert [e.token for e in final.output[-1].content[0].logprobs] == [
        e["token"] for e in entries
    ]
    assert final.output[-1].content[0].text == part.text


@pytest.mark.parametrize(
    "path,body,message",
    [
        ("/api/chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs must be an integer between 0 and 20"),
        ("/api/chat", {"top_logprobs": 2}, "top_logprobs requires logprobs"),
        ("/api/generate", {"logprobs": "yes"}, "logprobs must be a boolean"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs must be an integer"),
        ("/v1/completions", {"logprobs": 30}, "logprobs must be an integer between 0 and 20"),
    ],
)
def test_bad_logprobs_are_400s(path, body, message):
    req = {"model": MODEL, "stream": False, **body}
    if path in ("/api/generate", "/v1/completions"):
        req["prompt"] = "hi"
    else:
        req["messages"] = QUESTION
    r = httpx.post(f"http://{HOST}{path}", json=req, timeout=60)
    assert r.status_code == 400, r.text
    assert message in r.text
