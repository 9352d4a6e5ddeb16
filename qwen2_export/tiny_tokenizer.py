"""A small byte-level BPE tokenizer shaped like Qwen2's, for tests and the offline demo.

Same pipeline as the hub tokenizer.json (NFC, Qwen's split regex isolated, ByteLevel without prefix
space, ByteLevel decoder, no BOS) with a few hundred merges learned deterministically from a fixed
corpus, and Qwen's special tokens right after the BPE vocabulary, as on the hub.
"""

from __future__ import annotations

from collections import Counter

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
You are a helpful assistant. The assistant answers the user's question with care.
Tell me a story about a robot who learns to paint the sea and the sky at night.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n
Numbers 0 1 2 3 4 5 6 7 8 9 and 2024-06-01 or 3.14159; lists [1, 2, 3] and {"key": "value"}.
你好，世界！今天天气很好。我们一起去公园散步吧。 こんにちは世界。 Привет, мир! ¿Qué tal? naïve café
Emoji 😀 🚀 🎉 and symbols © ® ™ € £ ¥ → ← ≤ ≥ ∑ ∞.
"""


def byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE training; ties broken by the pair itself so the result never depends on hashing."""
    words = Counter(piece for piece, _ in byte_level_pre_tokenizer().pre_tokenize_str(corpus))
    spelled = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = spelled[word]
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word in words:
            spelled[word] = _merge(spelled[word], best)
    return merges


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def build_tiny_tokenizer(num_merges: int = 200) -> Tokenizer:
    """256 byte symbols + `num_merges` merges, then <|endoftext|>, <|im_start|>, <|im_end|>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_merges(CORPUS, num_merges)
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer
