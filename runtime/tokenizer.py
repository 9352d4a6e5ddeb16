"""Text <-> ids with the checkpoint's tokenizer.json (Hugging Face `tokenizers`)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import RuntimeInputError

# NFC normalization can shrink text (three Hangul jamo, 9 bytes, compose into one 3-byte syllable);
# dividing by this keeps `fewest_tokens` a true lower bound whatever the normalizer does
NORMALIZATION_SHRINK = 4


class TextTokenizer:
    def __init__(self, path: str | Path):
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for a missing or corrupt file
            raise RuntimeInputError(f"{path} is not a tokenizer the `tokenizers` library can read ({error}); "
                                    "re-export the artifact from a checkpoint with a valid tokenizer.json") from error
        # the longest token's UTF-8 size bounds how many bytes one token can cover
        self._longest_token_bytes = max((len(token.encode("utf-8", "surrogatepass")) for token in
                                         self._tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; special-token strings in it become their ids (as transformers does)."""
        return self._tokenizer.encode(checked_text(text), add_special_tokens=add_special_tokens).ids

    def fewest_tokens(self, utf8_bytes: int) -> int:
        """A lower bound on the tokens of any text of `utf8_bytes` bytes, which costs no tokenization (so
        a huge prompt is refused cheaply)."""
        return utf8_bytes // (self._longest_token_bytes * NORMALIZATION_SHRINK)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def checked_text(text: str) -> str:
    """`text` if it is valid Unicode; arguments and files that were not UTF-8 arrive with lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RuntimeInputError(f"the prompt is not valid UTF-8 (byte {error.start}); save it as UTF-8") from error
    return text
