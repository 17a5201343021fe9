#!/usr/bin/env python3
"""Reference token ids for the Gemma 3 GGUF vocabulary, from the SentencePiece library.

Gemma's tokenizer is a SentencePiece BPE model. This script rebuilds that model from the
vocabulary a GGUF carries (pieces, scores and piece types, which llama.cpp copies from
`tokenizer.model` unchanged) with Gemma's settings: no dummy prefix, whitespace kept and
escaped as U+2581, byte fallback, no Unicode normalization. It then encodes a fixed set of
texts with `sentencepiece` itself and writes

    tests/fixtures/tokens/gemma3.json   {"texts": [{"text": ..., "ids": [...]}, ...]}

Control and user-defined pieces written in a text (`<start_of_turn>`, and Gemma's
whitespace runs such as four spaces) become their own ids before SentencePiece sees the
text, as llama.cpp, Ollama and transformers' fast tokenizer match them in raw text: the text
is cut at each one (leftmost, longest first) and the pieces between them are encoded
separately. (SentencePiece alone matches user-defined pieces only after turning spaces into
U+2581, so it never emits the whitespace-run pieces, whose text holds plain spaces.)

Needs `pip install gguf sentencepiece protobuf` (wheels). Run it once after changing the
texts; the output is checked in so `cargo test` needs no Python.

Usage: scripts/gemma3-token-fixtures.py [GGUF] [OUT]
"""

import json
import sys
from pathlib import Path

import sentencepiece as spm
from gguf import GGUFReader
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = Path.home() / ".cache/candlewick/test-models/gemma-3-270m-q4_k_m.gguf"
DEFAULT_OUT = REPO / "tests/fixtures/tokens/gemma3.json"
# Piece types (SentencePiece's numbering, which GGUF keeps).
CONTROL, USER_DEFINED = 3, 4

TEXTS = [
    "Hello world",
    "def add(a, b):\n    return a + b\n",
    "  leading spaces and trailing   ",
    "tabs\tand\t\tmore tabs\n\n\nthree newlines",
    "The year 2025 had 365 days; π ≈ 3.14159.",
    "北京欢迎你！日本語のテキストも。한국어도.",
    "Emoji: 😀🎉👍🏽 and flags 🇩🇪",
    "naïve café résumé Straße",
    "<h1>Title</h1><p>para &amp; more</p>",
    "rare: \u0001\u007f \U00020000 \u2028 done",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after bos",
    "word<end_of_turn>",
    "    indented\n        twice",
    "",
    " ",
    "a",
    "unbelievably antidisestablishmentarianism",
]


def vocab(path):
    r = GGUFReader(str(path))
    f = r.fields

    def column(key, conv):
        field = f[key]
        return [conv(field.parts[i]) for i in field.data]

    tokens = column("tokenizer.ggml.tokens", lambda p: bytes(p).decode("utf-8"))
    scores = column("tokenizer.ggml.scores", lambda p: float(p[0]))
    types = column("tokenizer.ggml.token_type", lambda p: int(p[0]))
    model = bytes(f["tokenizer.ggml.model"].parts[-1]).decode()
    assert model == "llama", f"not a SentencePiece vocabulary: {model}"
    return tokens, scores, types


def build_processor(tokens, scores, types):
    m = sp_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    t = m.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 3, 2, 1, 0
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = False
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(m.SerializeToString())
    return sp


def encode(sp, whole, text):
    ids, rest = [], text
    while rest:
        hits = [(rest.find(c), -len(c), c) for c in whole if c in rest]
        if not hits:
            ids += sp.EncodeAsIds(rest)
            break
        at, _, c = min(hits)
        ids += sp.EncodeAsIds(rest[:at]) + [whole[c]]
        rest = rest[at + len(c):]
    return ids


def main():
    gguf = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_GGUF
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_OUT
    tokens, scores, types = vocab(gguf)
    sp = build_processor(tokens, scores, types)
    whole = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, USER_DEFINED)}
    cases = [{"text": t, "ids": encode(sp, whole, t)} for t in TEXTS]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        json.dump({"source": gguf.name, "texts": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(cases)} texts -> {out}")


if __name__ == "__main__":
    main()
