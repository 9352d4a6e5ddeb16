import pytest

from qwen2_export.tiny_tokenizer import build_tiny_tokenizer
from runtime.stream import REPLACEMENT, TextStream
from runtime.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tiny_tokenizer().save(str(path))
    return TextTokenizer(path)


@pytest.mark.parametrize("text", ["Hello 😀 world", "你好，世界！", "naïve café → ∞", "🚀🎉 mixed 中文 and emoji 😀!"])
def test_stream_never_emits_half_a_character_and_adds_up(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces_of_split_characters = [tokenizer.decode([i]) for i in ids]
    assert any(REPLACEMENT in piece for piece in pieces_of_split_characters), "case must split a character"
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all(REPLACEMENT not in piece for piece in pieces)
    assert "".join(pieces) == text == tokenizer.decode(ids)


def test_an_unfinished_character_is_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]  # drop the last byte of the emoji
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert REPLACEMENT not in "".join(pieces)
    assert "".join(pieces) + stream.finish() == tokenizer.decode(ids)
