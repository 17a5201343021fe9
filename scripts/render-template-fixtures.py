#!/usr/bin/env python3
"""Render golden chat-template fixtures with Python jinja2, the way `transformers` does.

The Rust renderer in src/model/chat_template.rs must produce byte-identical prompts to
`tokenizer.apply_chat_template(..., tokenize=False)`. This script is the reference side:
it sets up a jinja2 environment equivalent to transformers' (sandboxed, trim_blocks,
lstrip_blocks, loop controls, a `{% generation %}` tag, a `tojson` that keeps key order
and non-ASCII text, `raise_exception`, `strftime_now`), renders a fixed set of
conversations through each template and writes

    tests/fixtures/templates/<name>.jinja   the template source, byte for byte
    tests/fixtures/templates/<name>.json    special tokens + cases (inputs and expected
                                            output, or the error Python raised)

Run it once after changing the cases; the outputs are checked in so that
`cargo test --test integration chat_template` needs neither Python nor the model files.

Template sources:
  qwen2.5  tokenizer.chat_template of qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
  qwen3    chat_template of qwen3-tokenizer_config.json
  smollm2  tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf
  llama3.1 the official Llama-3.1-8B-Instruct template, already checked in as
           llama3.1.jinja (it is not in any of the cached model files)
  gemma3   our built-in Gemma turn template, src/model/templates/gemma3.jinja
  features a synthetic template (below) probing the jinja2 features templates use

Usage: scripts/render-template-fixtures.py [--models DIR] [--out DIR]
"""

import argparse
import json
import struct
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = Path.home() / ".cache" / "candlewick" / "test-models"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "templates"


# ---------------------------------------------------------------------------
# GGUF metadata (just enough to pull strings out of the key/value section)
# ---------------------------------------------------------------------------

# Scalar value types of the GGUF spec: type id -> struct format.
_GGUF_SCALARS = {
    0: "<B",  # u8
    1: "<b",  # i8
    2: "<H",  # u16
    3: "<h",  # i16
    4: "<I",  # u32
    5: "<i",  # i32
    6: "<f",  # f32
    7: "<?",  # bool
    10: "<Q",  # u64
    11: "<q",  # i64
    12: "<d",  # f64
}
_GGUF_STRING = 8
_GGUF_ARRAY = 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise EOFError("truncated GGUF file")
        return struct.unpack(fmt, data)[0]

    def string(self):
        n = self.unpack("<Q")
        return self.f.read(n).decode("utf-8")

    def value(self, vtype):
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_metadata(path):
    """Return the key/value metadata of a GGUF file as a dict (tensors are not read)."""
    with open(path, "rb") as f:
        r = _Reader(f)
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = r.unpack("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF v{version} is not supported")
        r.unpack("<Q")  # tensor count
        n_kv = r.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack("<I")
            meta[key] = r.value(vtype)
        return meta


def gguf_template(path):
    meta = read_gguf_metadata(path)
    tokens = meta.get("tokenizer.ggml.tokens", [])

    def special(key):
        idx = meta.get(key)
        return tokens[idx] if idx is not None and idx < len(tokens) else None

    return (
        meta["tokenizer.chat_template"],
        special("tokenizer.ggml.bos_token_id"),
        special("tokenizer.ggml.eos_token_id"),
    )


# ---------------------------------------------------------------------------
# The transformers environment, rebuilt
# ---------------------------------------------------------------------------


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find assistant
    tokens; for rendering it is transparent (its body is output unchanged)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        call = self.call_method("_passthrough")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _passthrough(self, caller):
        return caller()


def make_environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    # Same signature and defaults as transformers' filter: note ensure_ascii comes first.
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render(env, source, bos, eos, case):
    """Mirror transformers.render_jinja_template for one conversation."""
    template = env.from_string(source)
    kwargs = {}
    # special_tokens_map only carries tokens that are set
    if bos is not None:
        kwargs["bos_token"] = bos
    if eos is not None:
        kwargs["eos_token"] = eos
    kwargs.update(case.get("extra", {}))
    return template.render(
        messages=case["messages"],
        tools=case.get("tools"),
        documents=None,
        add_generation_prompt=case.get("add_generation_prompt", False),
        **kwargs,
    )


# ---------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京 or Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

# HTML-ish characters, quotes, numbers and nesting: the things json.dumps and a naive
# JSON serializer disagree on.
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "web_search",
        "description": "Search the web for <query> & return \"snippets\" with 'links'",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Search terms\n(one line)"},
                "max_results": {"type": "integer", "default": 5, "minimum": 1, "maximum": 20},
                "freshness": {"type": "number", "default": 0.5, "multipleOf": 0.25},
                "safe": {"type": "boolean", "default": True},
                "site": {"type": ["string", "null"], "default": None},
            },
            "required": ["query"],
        },
    },
}

TOOLS = [WEATHER_TOOL, SEARCH_TOOL]

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def weather_call(call_id="call_1", city="Paris"):
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": city, "unit": "celsius"}},
    }


def search_call(call_id="call_2"):
    return {
        "id": call_id,
        "type": "function",
        "function": {
            "name": "web_search",
            "arguments": {
                "query": "candle <rust> & \"ml\"",
                "max_results": 3,
                "freshness": 1.0,
                "tiny": 1e-07,
                "big": 1e21,
                "ok": True,
                "site": None,
                "nested": {"z": [1, 2.5, {"y": "ü"}], "a": [], "e": {}},
            },
        },
    }


def tool_roundtrip(content_for_call):
    """user -> assistant tool call -> tool result (with name) -> assistant -> user."""
    return [
        SYSTEM,
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": content_for_call, "tool_calls": [weather_call()]},
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "name": "get_weather",
            "content": '{"temperature": 18, "condition": "cloudy"}',
        },
        {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."},
        {"role": "user", "content": "Thanks! And tomorrow?"},
    ]


def tool_result_without_name(content_for_call):
    """LobeChat sends tool messages with tool_call_id but no name."""
    return [
        {"role": "user", "content": "Weather in Berlin?"},
        {
            "role": "assistant",
            "content": content_for_call,
            "tool_calls": [weather_call("call_9", "Berlin")],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "12°C, light rain"},
    ]


def parallel_calls(content_for_call):
    return [
        {"role": "user", "content": "Weather in Paris, and search candle news."},
        {
            "role": "assistant",
            "content": content_for_call,
            "tool_calls": [weather_call(), search_call()],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18°C"},
        {"role": "tool", "tool_call_id": "call_2", "name": "web_search", "content": "No news."},
    ]


MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "  Tell me a joke.  \n"},
    {"role": "assistant", "content": "Why did the GPU cross the road?\n"},
]

UNICODE = [
    {"role": "system", "content": "你是一个乐于助人的助手。Réponds en français si besoin."},
    {"role": "user", "content": "你好！今天天气怎么样？🌤️👍"},
    {"role": "assistant", "content": "你好😊 我无法查看实时天气。"},
    {"role": "user", "content": "Emoji test: 🦀🔥 — “quotes” ‘single’ \\ backslash\ttab"},
]


def common_cases(assistant_call_content):
    """The cases every template gets. `assistant_call_content` is the content of an
    assistant turn that carries tool_calls (None as OpenAI sends it, or "" for
    templates that concatenate content unconditionally)."""
    return [
        {
            "name": "system_user_generation_prompt",
            "messages": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
            "add_generation_prompt": True,
        },
        {
            "name": "user_only_generation_prompt",
            "messages": [{"role": "user", "content": "Hello"}],
            "add_generation_prompt": True,
        },
        {"name": "multi_turn", "messages": MULTI_TURN, "add_generation_prompt": False},
        {
            "name": "multi_turn_generation_prompt",
            "messages": MULTI_TURN + [{"role": "user", "content": "Another one"}],
            "add_generation_prompt": True,
        },
        {
            "name": "tools_defined",
            "messages": [SYSTEM, {"role": "user", "content": "Weather in Paris?"}],
            "tools": TOOLS,
            "add_generation_prompt": True,
        },
        {
            "name": "tools_defined_no_system",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": TOOLS,
            "add_generation_prompt": True,
        },
        {
            "name": "tool_call_roundtrip",
            "messages": tool_roundtrip(assistant_call_content),
            "tools": TOOLS,
            "add_generation_prompt": True,
        },
        {
            "name": "tool_result_without_name",
            "messages": tool_result_without_name(assistant_call_content),
            "tools": TOOLS,
            "add_generation_prompt": True,
        },
        {
            "name": "unicode",
            "messages": UNICODE,
            "add_generation_prompt": True,
        },
    ]


def qwen25_cases():
    return common_cases(None) + [
        {
            "name": "parallel_tool_calls",
            "messages": parallel_calls(None),
            "tools": TOOLS,
            "add_generation_prompt": True,
        },
        {
            "name": "tool_call_with_content",
            "messages": parallel_calls("Let me check both."),
            "tools": TOOLS,
            "add_generation_prompt": True,
        },
        {
            "name": "tool_call_arguments_as_string",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"city": "Paris"}',
                            },
                        }
                    ],
                },
            ],
            "tools": TOOLS,
        },
        {
            "name": "error_user_content_null",
            "messages": [{"role": "user", "content": None}],
            "add_generation_prompt": True,
        },
    ]


def qwen3_cases():
    think_history = [
        {"role": "user", "content": "What is 17*3?"},
        {
            "role": "assistant",
            "content": "<think>\n17*3 = 51\n</think>\n\n51",
        },
        {"role": "user", "content": "And 17*4?"},
        {
            "role": "assistant",
            "content": "68",
            "reasoning_content": "17*4 = 68, easy.",
        },
    ]
    multi_step = [
        SYSTEM,
        {"role": "user", "content": "Weather in Paris and Berlin?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I need two lookups.",
            "tool_calls": [weather_call("call_1", "Paris")],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18°C"},
        {
            "role": "assistant",
            "content": "<think>\nNow Berlin.\n</think>\n\nChecking Berlin too.",
            "tool_calls": [weather_call("call_2", "Berlin")],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": "12°C"},
    ]
    return common_cases("") + [
        {
            "name": "enable_thinking_false",
            "messages": [{"role": "user", "content": "Quick answer: capital of France?"}],
            "add_generation_prompt": True,
            "extra": {"enable_thinking": False},
        },
        {
            "name": "enable_thinking_true",
            "messages": [{"role": "user", "content": "Quick answer: capital of France?"}],
            "add_generation_prompt": True,
            "extra": {"enable_thinking": True},
        },
        {
            "name": "thinking_history",
            "messages": think_history,
            "add_generation_prompt": False,
        },
        {
            "name": "thinking_history_next_turn",
            "messages": think_history + [{"role": "user", "content": "Thanks"}],
            "add_generation_prompt": True,
            "extra": {"enable_thinking": False},
        },
        {
            "name": "multi_step_tools_with_reasoning",
            "messages": multi_step,
            "tools": TOOLS,
            "add_generation_prompt": True,
            "extra": {"enable_thinking": True},
        },
        {
            "name": "parallel_tool_calls",
            "messages": parallel_calls(""),
            "tools": TOOLS,
            "add_generation_prompt": True,
        },
        {
            "name": "tool_response_wrapped_in_user_message",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [weather_call()]},
                {"role": "user", "content": "<tool_response>\n18°C\n</tool_response>"},
            ],
            "tools": TOOLS,
            "add_generation_prompt": True,
        },
        {
            "name": "error_assistant_content_null",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None},
            ],
        },
    ]


def smollm2_cases():
    return common_cases("") + [
        {
            "name": "no_generation_prompt",
            "messages": [{"role": "user", "content": "Hello"}],
            "add_generation_prompt": False,
        },
    ]


def llama31_cases():
    date = {"date_string": "09 Mar 2025"}

    def with_date(case):
        case.setdefault("extra", {}).update(date)
        return case

    cases = [with_date(c) for c in common_cases(None)]
    cases += [
        {
            "name": "default_date_string",
            "messages": [{"role": "user", "content": "What day is it?"}],
            "add_generation_prompt": True,
        },
        with_date(
            {
                "name": "tools_in_system_message",
                "messages": [SYSTEM, {"role": "user", "content": "Weather in Paris?"}],
                "tools": TOOLS,
                "add_generation_prompt": True,
                "extra": {"tools_in_user_message": False},
            }
        ),
        with_date(
            {
                "name": "tool_result_as_mapping",
                "messages": [
                    {"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [search_call()]},
                    {
                        "role": "tool",
                        "content": {"results": ["a", "b"], "count": 2, "ok": True},
                    },
                ],
                "tools": TOOLS,
                "add_generation_prompt": True,
            }
        ),
        with_date(
            {
                "name": "builtin_tools",
                "messages": [
                    {"role": "user", "content": "Search for the rust candle crate"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {
                                    "name": "brave_search",
                                    "arguments": {"query": "rust candle crate"},
                                },
                            }
                        ],
                    },
                    {"role": "ipython", "content": "candle: minimalist ML framework"},
                ],
                "add_generation_prompt": True,
                "extra": {"builtin_tools": ["brave_search", "code_interpreter", "wolfram_alpha"]},
            }
        ),
        with_date(
            {
                "name": "error_parallel_tool_calls",
                "messages": parallel_calls(None),
                "tools": TOOLS,
                "add_generation_prompt": True,
            }
        ),
        with_date(
            {
                "name": "error_tools_without_user_message",
                "messages": [SYSTEM],
                "tools": TOOLS,
                "add_generation_prompt": True,
            }
        ),
    ]
    return cases


def gemma3_cases():
    return common_cases("") + [
        {
            "name": "content_parts_with_image",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "  What is in this picture? "},
                        {"type": "image"},
                        {"type": "text", "text": "Be brief."},
                    ],
                }
            ],
            "add_generation_prompt": True,
        },
        {
            "name": "consecutive_user_turns",
            "messages": [
                {"role": "user", "content": "First."},
                {"role": "user", "content": "Second."},
            ],
            "add_generation_prompt": True,
        },
        {
            "name": "system_only",
            "messages": [SYSTEM],
            "add_generation_prompt": True,
        },
        {
            "name": "assistant_content_null",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None},
            ],
        },
    ]


# A synthetic template for the jinja2 features real templates lean on, so that a
# difference shows up here before it shows up in some model's prompt. Indented block tags
# without `-` exercise trim_blocks/lstrip_blocks.
FEATURES_TEMPLATE = """{#- jinja2 / transformers feature probe -#}
{% set ns = namespace(count=0, roles='') %}
{% for m in messages[::-1] %}
    {% if m.role == 'skip' %}
        {% continue %}
    {% endif %}
    {% if loop.index > 10 %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% set ns.roles = ns.roles + m.role[:1] %}
{{ loop.index0 }}:{{ m.role }}:{{ m.content if m.content is string else m.content | tojson }}{% if loop.last %}!{% endif %}

{% endfor %}
count={{ ns.count }} roles={{ ns.roles }}
{% generation %}gen {{ messages|length }}{% endgeneration %}

{%- if tools is not none %}
indent2={{ tools | tojson(indent=2) }}
compact={{ tools | tojson(separators=(',', ':')) }}
sorted={{ tools[0] | tojson(sort_keys=true) }}
ascii={{ tools[0] | tojson(ensure_ascii=true) }}
indent_str={{ tools[0].function.parameters.required | tojson(indent='\\t') }}
positional={{ [1, 'é'] | tojson(true) }}
{% endif %}
str: {{ true }} {{ false }} {{ none }} {{ 1.5 }} {{ 10 }} {{ 1e-7 }} {{ [1, 'a', none, true, 2.0] }}
repr: {{ messages[0] }} {{ messages[0] | string }} {{ flag | string }}
quotes: {{ ["it's", 'say "hi"', 'both \\' "', 'tab\\there'] }}
{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}

{% for k in messages[0] %}{{ k }},{% endfor %}

{% for k, v in messages[0] | items %}{{ k }}:{{ v }}|{% endfor %}

get: {{ messages[0].get('missing', 'dflt') }} {{ messages[0].get('role') }} {{ messages[0].get('nope') }}
tests: {{ messages[0] is mapping }} {{ messages is mapping }} {{ 'x' is string }} {{ messages is iterable }} {{ 'abc' is iterable }} {{ flag is false }} {{ flag is true }}
strings: {{ ' padded '.strip() }}|{{ 'a,b,c'.split(',') | join('+') }}|{{ 'Hello'.startswith('He') }}|{{ 'x\\n\\n'.rstrip('\\n') }}|{{ 'a b  c'.split() | length }}|{{ 'Hi' | upper }}|{{ '  t  ' | trim }}|{{ 'abc'[::-1] }}|{{ 'abcdef'[1:3] }}|{{ 'abc'[-1] }}
concat: {{ 'abc' ~ 1 ~ 'd' }} {{ 'abc' + 'def' }} {{ [1] + [2] }} {{ 'm=' ~ messages[3].content }}
tokens: {{ bos_token }}|{{ eos_token }}
undefined: [{{ undefined_var }}] {{ undefined_var is defined }} {{ messages[99] is defined }} {{ none_var is none }}
{% if strftime_now is defined %}strftime: {{ strftime_now('%Y-%m-%d') | length }}{% endif %}

{% if 'content' in messages[0] and 'zzz' not in messages[0] %}in-ok{% endif %}

{% macro greet(name, punct='!') %}Hello {{ name }}{{ punct }}{% endmacro %}
{{ greet('world') }} {{ greet('you', punct='?') }}
{% set block %}  captured {{ messages|length }}  {% endset %}
[{{ block }}]
{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(', ') }}
{{ messages | map(attribute='role') | unique | list | length }} {{ messages | rejectattr('role', 'equalto', 'user') | list | length }}
{{ range(3) | list }} {{ (messages | first).role }} {{ (messages | last).role }}
  {%+ if true %}lstrip-disabled{% endif %}
    {% if true %}
    kept-indent
    {% endif %}
{# a comment #}
  {# an indented comment #}
dict literal: {{ {'name': 'x', 'arguments': {'b': 1, 'a': [true, none]}} | tojson }}
{%- if fail == 'raise' %}
{{ raise_exception('custom failure after ' ~ messages|length ~ ' messages') }}
{%- elif fail == 'method' %}
{{ 'x'.no_such_method() }}
{%- elif fail == 'undefined' %}
{{ nothing.at.all }}
{%- elif fail == 'tojson_undefined' %}
{{ nothing | tojson }}
{%- endif %}
"""

FEATURE_MESSAGES = [
    {"role": "system", "content": "Sys ünï", "name": "sys"},
    {"role": "user", "content": "Hi <b>&</b> \"q\" 'a' \\ \u0001 \u007f 😀"},
    {"role": "skip", "content": "skipped"},
    {"role": "assistant", "content": {"structured": [1, 2]}},
    {"role": "user", "content": "Bye"},
]


def features_cases():
    base = {"messages": FEATURE_MESSAGES, "extra": {"flag": False, "none_var": None}}
    return [
        dict(base, name="no_tools"),
        dict(base, name="with_tools", tools=TOOLS, add_generation_prompt=True),
        dict(base, name="error_raise_exception", extra={"fail": "raise"}),
        dict(base, name="error_unknown_method", extra={"fail": "method"}),
        dict(base, name="error_undefined_attribute", extra={"fail": "undefined"}),
        dict(base, name="error_tojson_undefined", extra={"fail": "tojson_undefined"}),
    ]


# ---------------------------------------------------------------------------


def build_fixture(env, name, source, bos, eos, cases, out):
    (out / f"{name}.jinja").write_text(source, encoding="utf-8", newline="")
    rendered = []
    for case in cases:
        case = dict(case)
        try:
            case["expected"] = render(env, source, bos, eos, case)
        except Exception as e:  # noqa: BLE001 - any failure is the expected outcome
            case["error"] = f"{type(e).__name__}: {e}"
        rendered.append(case)
    fixture = {
        "template": f"{name}.jinja",
        "bos_token": bos,
        "eos_token": eos,
        "cases": rendered,
    }
    with open(out / f"{name}.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=2)
        f.write("\n")
    errors = sum(1 for c in rendered if "error" in c)
    print(f"{name}: {len(rendered)} cases ({errors} errors)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"jinja2 {jinja2.__version__}")
    env = make_environment()

    src, bos, eos = gguf_template(args.models / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    build_fixture(env, "qwen2.5", src, bos, eos, qwen25_cases(), args.out)

    cfg = json.loads((args.models / "qwen3-tokenizer_config.json").read_text(encoding="utf-8"))
    build_fixture(
        env, "qwen3", cfg["chat_template"], cfg.get("bos_token"), cfg.get("eos_token"),
        qwen3_cases(), args.out,
    )

    src, bos, eos = gguf_template(args.models / "SmolLM2-135M-Instruct.Q4_1.gguf")
    build_fixture(env, "smollm2", src, bos, eos, smollm2_cases(), args.out)

    llama = args.out / "llama3.1.jinja"
    if not llama.exists():
        sys.exit(f"{llama} is missing: it is checked in, restore it from git")
    with open(llama, encoding="utf-8", newline="") as f:
        src = f.read()
    build_fixture(env, "llama3.1", src, "<|begin_of_text|>", "<|eot_id|>", llama31_cases(), args.out)

    build_fixture(env, "features", FEATURES_TEMPLATE, "<s>", "</s>", features_cases(), args.out)

    gemma = REPO / "src" / "model" / "templates" / "gemma3.jinja"
    with open(gemma, encoding="utf-8", newline="") as f:
        src = f.read()
    build_fixture(env, "gemma3", src, "<bos>", "<eos>", gemma3_cases(), args.out)


if __name__ == "__main__":
    main()
