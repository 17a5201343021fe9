"""The official Python clients (`ollama`, `openai`) against a running `wick serve`.

Run by tests/integration/api_clients.rs, which starts the server with the SmolLM2 test model
imported as `smollm2:135m` and sets OLLAMA_HOST to its address.
"""

import os

import ollama
import pytest

MODEL = "smollm2:135m"
QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]
HOST = os.environ["OLLAMA_HOST"]


def test_chat_non_stream(client):
    r = client.chat(model=MODEL, messages=QUESTION, options={"temperature": 0})
    assert r.message.role == "assistant"
    assert "Berlin" in r.message.content
    assert r.done and r.done_reason == "stop"
    assert r.eval_count > 0 and r.prompt_eval_count > 0


def test_chat_stream(client):
    parts = list(
        client.chat(model=MODEL, messages=QUESTION, stream=True, options={"temperature": 0})
    )
    assert len(parts) > 2
    assert all(p.message.role == "assistant" for p in parts)
    assert parts[-1].done
    assert "Berlin" in "".join(p.message.content for p in parts)


def test_generate(client):
    r = client.generate(
        model=MODEL, prompt="Name a color.", options={"temperature": 0, "num_predict": 8}
    )
    assert r.done
    assert r.response
    assert r.eval_count == 8 or r.done_reason == "stop"


def test_list(client):
    models = client.list().models
    m = next(m for m in models if m.model == MODEL)
    assert m.details.family == "llama"
    assert m.size > 0
    assert m.modified_at is not None


def test_show(client):
    r = client.show(MODEL)
    assert r.modelinfo["general.architecture"] == "llama"
    assert r.modelinfo["llama.context_length"] > 0
    assert "completion" in r.capabilities


def test_missing_model_raises(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=QUESTION)
    assert e.value.status_code == 404
    assert 'model "no-such-model" not found' in str(e.value)


def test_openai_chat_stream_with_usage(oai):
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        max_tokens=30,
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert "Berlin" in text
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_chat_non_stream(oai):
    r = oai.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert "Berlin" in r.choices[0].message.content
    assert r.usage.completion_tokens > 0


def test_openai_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert MODEL in ids
    assert oai.models.retrieve(MODEL).id == MODEL


REGISTRY = os.environ["WICK_TEST_REGISTRY"]
PULLED = f"{REGISTRY}/library/smollm2:135m"


def test_pull_from_registry(client):
    parts = list(client.pull(PULLED, insecure=True, stream=True))
    assert parts[0].status == "pulling manifest"
    assert parts[-1].status == "success"
    layers = [p for p in parts if p.digest]
    assert layers and all(p.status == f"pulling {p.digest[7:19]}" for p in layers)
    assert any(p.total and p.completed == p.total for p in layers)
    assert client.pull(PULLED, insecure=True).status == "success"
    assert PULLED in [m.model for m in client.list().models]
    assert client.show(PULLED).modelinfo["general.architecture"] == "llama"


def test_pull_unknown_model_raises(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.pull(f"{REGISTRY}/library/no-such-model", insecure=True)
    assert "pull model manifest: file does not exist" in str(e.value)


def test_copy_create_and_delete(client, tmp_path):
    assert client.copy(MODEL, "py-copy:1").status == "success"
    assert "py-copy:1" in [m.model for m in client.list().models]
    r = client.create(model="py-made", from_="py-copy:1", system="Answer in one word.")
    assert r.status == "success"
    assert "SYSTEM \"\"\"Answer in one word.\"\"\"" in client.show("py-made").modelfile
    # A blob upload, then a model made from it.
    path = tmp_path / "tiny.txt"
    path.write_text("not a model")
    digest = client.create_blob(path)
    assert digest.startswith("sha256:")
    for name in ("py-copy:1", "py-made"):
        assert client.delete(name).status == "success"
    names = [m.model for m in client.list().models]
    assert "py-copy:1" not in names and "py-made:latest" not in names
    assert MODEL in names
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("py-made")
    assert e.value.status_code == 404
