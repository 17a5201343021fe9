"""Images through the official Python clients, against the `wick serve` that
tests/integration/vision.rs started (OLLAMA_HOST) with `gemma3-vision` (a Gemma 3 GGUF with
a vision tower) and `gemma3-text` (the same text model without one); WICK_TEST_IMAGE is a
PNG."""

import base64
import os

import ollama
import openai
import pytest

HOST = os.environ["OLLAMA_HOST"]
IMAGE = os.environ["WICK_TEST_IMAGE"]
OPTIONS = {"temperature": 0, "num_predict": 8}


def test_show_says_vision():
    client = ollama.Client(host=HOST)
    assert "vision" in client.show("gemma3-vision").capabilities
    assert "vision" not in client.show("gemma3-text").capabilities


def test_ollama_image_path_bytes_and_openai_image_url_agree():
    client = ollama.Client(host=HOST)
    by_path = client.chat(
        model="gemma3-vision",
        messages=[{"role": "user", "content": "Describe.", "images": [IMAGE]}],
        options=OPTIONS,
    )
    with open(IMAGE, "rb") as f:
        data = f.read()
    by_bytes = client.chat(
        model="gemma3-vision",
        messages=[{"role": "user", "content": "Describe.", "images": [data]}],
        options=OPTIONS,
    )
    assert by_path.message.content == by_bytes.message.content
    assert by_path.prompt_eval_count > 16

    generated = client.generate(
        model="gemma3-vision", prompt="Describe.", images=[IMAGE], options=OPTIONS
    )
    assert generated.prompt_eval_count == by_path.prompt_eval_count

    oai = openai.OpenAI(base_url=f"http://{HOST}/v1", api_key="wick")
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    resp = oai.chat.completions.create(
        model="gemma3-vision",
        temperature=0,
        max_tokens=8,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
    )
    assert resp.choices[0].message.content == by_path.message.content


def test_a_model_without_vision_refuses_images():
    client = ollama.Client(host=HOST)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(
            model="gemma3-text",
            messages=[{"role": "user", "content": "Describe.", "images": [IMAGE]}],
        )
    assert e.value.status_code == 400
    assert "does not support image input" in e.value.error
