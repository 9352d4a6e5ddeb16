"""Step inputs for the two padding contracts a graph can declare in the manifest.

left  (portable graph): pads before each prompt, mask 0 on them, position ids count real tokens only;
      every row's new token sits at the last column.
right (GroupQueryAttention graphs): pads after each prompt; the mask has ones on each row's cached and
      new tokens, then zeros; positions are implied by the mask, so no position ids.
"""

from __future__ import annotations

import numpy as np


class LeftPadding:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.mask: np.ndarray | None = None
        self.positions: np.ndarray | None = None

    def prefill(self, prompts: list[list[int]], reused: int,
                width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert width is None, "the concat layout's masks grow with the cache"
        if reused:  # batch 1 continuing a cached conversation
            prompt = prompts[0]
            self.mask = np.ones((1, len(prompt)), np.int64)
            self.positions = np.arange(reused, len(prompt), dtype=np.int64)[None]
            return np.array([prompt[reused:]], dtype=np.int64), self.mask, self.positions
        longest = max(len(prompt) for prompt in prompts)
        ids = np.full((len(prompts), longest), self.pad, dtype=np.int64)
        self.mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = prompt
            self.mask[row, longest - len(prompt):] = 1
        self.positions = np.maximum(self.mask.cumsum(axis=1) - 1, 0)
        return ids, self.mask, self.positions

    def decode(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        self.positions = self.positions[:, -1:] + 1
        return np.array(tokens, dtype=np.int64)[:, None], self.mask, self.positions


class RightPadding:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.lengths = np.zeros(0, np.int64)  # tokens each row holds after the step
        # set by the decode loop to the KV buffer's capacity: decode masks of one fixed width keep every
        # decode step's shapes identical, which CUDA-graph replay needs; GQA reads lengths from the ones
        self.decode_width: int | None = None

    def prefill(self, prompts: list[list[int]], reused: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray, None]:
        """`width` pads a fresh prompt further, to a captured graph's length (default: the longest row)."""
        if reused:
            self.lengths = np.array([len(prompts[0])], np.int64)
            return np.array([prompts[0][reused:]], dtype=np.int64), self._mask(), None
        longest = width or max(len(prompt) for prompt in prompts)
        ids = np.full((len(prompts), longest), self.pad, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        self.lengths = np.array([len(prompt) for prompt in prompts], np.int64)
        return ids, self._mask(longest), None

    def decode(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray, None]:
        self.lengths = self.lengths + 1
        return np.array(tokens, dtype=np.int64)[:, None], self._mask(self.decode_width), None

    def _mask(self, width: int | None = None) -> np.ndarray:
        columns = width or self.lengths.max()
        return (np.arange(columns)[None, :] < self.lengths[:, None]).astype(np.int64)


PADDINGS = {"left": LeftPadding, "right": RightPadding}
