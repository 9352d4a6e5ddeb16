"""Text <-> ids with the checkpoint's tokenizer.json (Hugging Face `tokenizers`)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import RuntimeInputError

# how much a normalizer can shrink UTF-8 text: NFC composes three Hangul jamo (9 bytes) into one 3-byte
# syllable; other normalizers (replacements, say) have no bound, and then no cheap bound is claimed
SHRINK = {"NoneType": 1, "NFC": 3}


class TextTokenizer:
    def __init__(self, path: str | Path):
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for a missing or corrupt file
            raise RuntimeInputError(f"{path} is not a tokenizer the `tokenizers` library can read ({error}); "
                                    "re-export the artifact from a checkpoint with a valid tokenizer.json") from error
        self._bytes_per_token = bytes_per_token(self._tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; special-token strings in it become their ids (as transformers does)."""
        return self._tokenizer.encode(checked_text(text), add_special_tokens=add_special_tokens).ids

    def fewest_tokens(self, utf8_bytes: int) -> int:
        """A lower bound on the tokens of any text of `utf8_bytes` bytes, which costs no tokenization (so
        a huge prompt is refused cheaply); 0 when the tokenizer allows no such bound."""
        return utf8_bytes // self._bytes_per_token if self._bytes_per_token else 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def bytes_per_token(tokenizer: Tokenizer) -> int | None:
    """The most input bytes one token can stand for (None: unbounded): the longest token, counted in
    input bytes, times what the normalizer can shrink. Byte-level vocabularies spell each input byte
    as one character; added tokens match their text as written."""
    shrink = SHRINK.get(type(tokenizer.normalizer).__name__)
    if shrink is None:
        return None
    byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
    regular = (len(token) if byte_level else len(token.encode("utf-8", "surrogatepass"))
               for token in tokenizer.get_vocab(with_added_tokens=False))
    added = (len(token.content.encode("utf-8", "surrogatepass")) for token in tokenizer.get_added_tokens_decoder().values())
    return max(*regular, *added, 1) * shrink


def utf8_size(text: str) -> int:
    """The UTF-8 size of `text`; RuntimeInputError when it is not valid Unicode (arguments and files that
    were not UTF-8 arrive with lone surrogates)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise RuntimeInputError(f"the prompt is not valid UTF-8 (byte {error.start}); save it as UTF-8") from error


def checked_text(text: str) -> str:
    utf8_size(text)
    return text
