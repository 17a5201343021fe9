"""The official clients, pointed at the `wick serve` that tests/integration/api_clients.rs
started (OLLAMA_HOST), shared by the test files here."""

import os

import anthropic
import ollama
import openai
import pytest

HOST = os.environ["OLLAMA_HOST"]


@pytest.fixture(scope="session")
def client():
    return ollama.Client(host=HOST)


@pytest.fixture(scope="session")
def oai():
    return openai.OpenAI(base_url=f"http://{HOST}/v1", api_key="wick")


@pytest.fixture(scope="session")
def claude():
    return anthropic.Anthropic(base_url=f"http://{HOST}", api_key="wick")
