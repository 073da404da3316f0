"""The engine's tokenizer against llama.cpp's own tokenizer test vectors.

``llama.cpp/models/ggml-vocab-NAME.gguf.inp`` holds test strings separated by
``"\\n__ggml_vocab_test__\\n"`` and ``.out`` the expected ids, one line of
space-separated integers per string (written from the Hugging Face tokenizer
by ``convert_hf_to_gguf_update.py``). ``tests/test-tokenizer-0.cpp`` reads
them exactly as :func:`read_vocab_tests` does here and tokenizes each string
with ``common_tokenize(ctx, text, add_special=false, parse_special=false)``;
it checks the ids only (the detokenized text is printed, not compared).

The round trip that upstream *does* check is ``tests/test-tokenizer-1-spm.cpp``
(registered in CTest for ``llama-spm`` only): every token id detokenized with
special tokens rendered, re-tokenized with ``parse_special=true`` and
detokenized again gives the same text; and every Unicode code point (minus
surrogates and the unassigned planes 4..14) survives tokenize -> detokenize,
except U+2581 (the SentencePiece space marker). Both are reproduced below.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xybrid._native._engine import Model
from xybrid.errors import InvalidInputError

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "llama.cpp" / "models"
SEP = "\n__ggml_vocab_test__\n"

VOCABS = sorted(
    p.name[len("ggml-vocab-"):-len(".gguf")]
    for p in MODELS_DIR.glob("ggml-vocab-*.gguf")
    if p.with_name(p.name + ".inp").is_file() and p.with_name(p.name + ".out").is_file()
)


def vocab_file(name: str) -> Path:
    return MODELS_DIR / f"ggml-vocab-{name}.gguf"


def read_vocab_tests(path: Path) -> dict[str, list[int]]:
    """``read_tests`` of test-tokenizer-0.cpp, byte for byte.

    Inputs: split on SEP; the piece after the last separator is kept only if
    non-empty (the C++ loop stops when ``pos`` reaches the end). Outputs:
    ``std::getline`` lines (a final newline adds no empty line), stripped,
    split on single spaces. Results go into a ``std::map``: a repeated input
    keeps its last expected ids.
    """
    raw = path.with_name(path.name + ".inp").read_bytes().decode("utf-8")
    out = path.with_name(path.name + ".out").read_bytes().decode("utf-8")
    inputs: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = out.split("\n")
    if out.endswith("\n"):
        lines.pop()
    assert len(inputs) == len(lines), f"{path.name}: {len(inputs)} inputs but {len(lines)} outputs"
    tests: dict[str, list[int]] = {}
    for text, line in zip(inputs, lines):
        # string_strip trims whitespace (" \t\n\r\f\v") on both sides.
        stripped = line.strip(" \t\n\r\f\v")
        tests[text] = [int(tok) for tok in stripped.split(" ")] if stripped else []
    return tests


@pytest.fixture(scope="module")
def vocab_models():
    """Vocab-only models, loaded once per module (the larger ones take ~1 s)."""
    cache: dict[str, Model] = {}

    def get(name: str) -> Model:
        if name not in cache:
            cache[name] = Model(str(vocab_file(name)), vocab_only=True)
        return cache[name]

    yield get
    for model in cache.values():
        model.close()


def test_vocab_files_found():
    # The pinned llama.cpp ships 15 vocabularies with test vectors; make sure
    # the glob did not silently come back (nearly) empty.
    assert len(VOCABS) >= 10, VOCABS
    assert "llama-spm" in VOCABS and "gpt-2" in VOCABS


@pytest.mark.parametrize("name", VOCABS)
def test_tokenize_matches_upstream_vectors(name, vocab_models):
    model = vocab_models(name)
    assert model.vocab_only
    tests = read_vocab_tests(vocab_file(name))
    assert len(tests) >= 40
    failures = []
    for text, expected in tests.items():
        got = model.tokenize(text, add_special=False, parse_special=False)
        if got != expected:
            failures.append((text, expected, got))
    assert not failures, "\n".join(
        f"{text!r}: expected {exp} got {got}" for text, exp, got in failures[:5])


def _clean_up_tokenization_spaces(text: str) -> str:
    """Hugging Face's ``clean_up_tokenization``, which llama.cpp applies on
    detokenization for vocabularies with ``clean_spaces`` set."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# How detokenize(tokenize(text)) relates to text, per vocabulary. "exact":
# it is the text. "clean_spaces": it is the text after HF's space clean-up
# (GPT-2-style BPE vocabularies). "normalized": the vocabulary normalizes its
# input (BERT: lowercase, accents stripped, spaces around punctuation), so
# only idempotence holds: detokenizing re-tokenized output changes nothing.
ROUND_TRIP = {
    "bert-bge": "normalized",
    "falcon": "clean_spaces", "gemma-4": "clean_spaces", "gpt-2": "clean_spaces",
    "llama-bpe": "clean_spaces", "mpt": "clean_spaces", "refact": "clean_spaces",
    "starcoder": "clean_spaces",
}


@pytest.mark.parametrize("name", VOCABS)
def test_detokenize_round_trip(name, vocab_models):
    model = vocab_models(name)
    mode = ROUND_TRIP.get(name, "exact")
    for text, expected in read_vocab_tests(vocab_file(name)).items():
        # detokenize works on the upstream ids as well as on ours (they are equal,
        # see above; this keeps the round trip meaningful on its own).
        back = model.detokenize(expected)
        assert back == model.detokenize(model.tokenize(text, add_special=False))
        if mode == "exact":
            assert back == text, (text, back)
        elif mode == "clean_spaces":
            assert back == _clean_up_tokenization_spaces(text), (text, back)
        else:
            again = model.detokenize(model.tokenize(back, add_special=False))
            assert again == back, (text, back, again)


def test_spm_every_token_round_trips(vocab_models):
    """test-tokenizer-1-spm.cpp, first half: every id of the llama-spm vocab."""
    model = vocab_models("llama-spm")
    n_vocab = model.n_vocab
    assert n_vocab == 32000
    failures = []
    for tok in range(n_vocab):
        text = model.detokenize([tok], unparse_special=True)
        ids = model.tokenize(text, add_special=False, parse_special=True)
        check = model.detokenize(ids, unparse_special=True)
        if check != text:
            failures.append((tok, text, check))
    assert not failures, failures[:5]


def test_spm_every_code_point_round_trips(vocab_models):
    """test-tokenizer-1-spm.cpp, second half: every Unicode code point."""
    model = vocab_models("llama-spm")
    failures = []
    n = 0
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF or 0x40000 <= cp <= 0xE0000:
            continue
        text = chr(cp)
        check = model.detokenize(model.tokenize(text, add_special=False, parse_special=True),
                                 unparse_special=True)
        n += 1
        if cp != 9601 and check != text:
            failures.append(hex(cp))
    assert n > 400_000
    assert not failures, failures[:10]


def test_add_special_and_parse_special(vocab_models):
    model = vocab_models("llama-spm")
    plain = model.tokenize("Hello world", add_special=False)
    assert model.add_bos
    assert model.tokenize("Hello world", add_special=True) == [model.bos_token] + plain
    # "<s>" is spelled out unless parse_special turns it into the BOS token.
    assert model.bos_token not in model.tokenize("<s>Hi", add_special=False)
    assert model.tokenize("<s>Hi", add_special=False, parse_special=True)[0] == model.bos_token
    # Special tokens render empty unless asked for.
    assert model.detokenize([model.bos_token]) == ""
    assert model.detokenize([model.bos_token], unparse_special=True) == "<s>"
    assert "<s>" not in model.detokenize([model.bos_token] + plain, remove_special=True,
                                         unparse_special=True)
    assert model.token_to_piece(model.bos_token) == b""
    assert model.token_to_piece(model.bos_token, special=True) == b"<s>"
    assert model.tokenize("", add_special=False) == []
    assert model.detokenize([]) == ""


def test_token_to_piece_is_bytes_and_joins_to_text(vocab_models):
    # Pieces are raw bytes: a byte-fallback token is a lone UTF-8 fragment.
    model = vocab_models("llama-spm")
    text = "naïve 🦙 façade"
    ids = model.tokenize(text, add_special=False)
    pieces = [model.token_to_piece(t) for t in ids]
    assert all(isinstance(p, bytes) for p in pieces)
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces), pieces  # <0xF0> and friends
    # SPM pieces carry the leading space the tokenizer added; detokenize drops it.
    assert b"".join(pieces).decode("utf-8") == " " + text
    assert model.detokenize(ids) == text


def test_long_pieces_grow_the_detokenize_buffer(vocab_models):
    """detokenize starts with 8 bytes per token and must grow when the pieces are
    longer (a retry path in the binding)."""
    model = vocab_models("qwen2")
    longest = max(range(model.n_vocab), key=lambda t: len(model.token_to_piece(t)))
    piece = model.token_to_piece(longest)
    assert len(piece) > 40
    text = model.detokenize([longest] * 50)
    assert text.encode("utf-8") == piece * 50


def test_long_text_grows_the_tokenize_buffer(vocab_models):
    # One token per byte is the worst case the first buffer is sized for;
    # the binding must also handle BOS/EOS on top (bert adds [CLS] and [SEP]).
    model = vocab_models("bert-bge")
    text = "a " * 5000
    ids = model.tokenize(text, add_special=True)
    assert len(ids) == 5002
    assert model.tokenize("", add_special=True) == ids[:1] + ids[-1:]


def test_tokenizer_bad_input(vocab_models):
    model = vocab_models("llama-spm")
    with pytest.raises(InvalidInputError, match="str"):
        model.tokenize(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="str"):
        model.tokenize(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        model.token_to_piece(32000)
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        model.token_to_piece(-1)
    with pytest.raises(InvalidInputError, match=r"tokens\[1\]"):
        model.detokenize([1, 99999])
    with pytest.raises(InvalidInputError, match=r"tokens\[0\]"):
        model.detokenize(["a"])
    # still fine afterwards
    assert model.detokenize(model.tokenize("ok", add_special=False)) == "ok"
