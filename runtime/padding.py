"""Step inputs for the two padding contracts a graph can declare in the manifest.

left  (portable graph): pads before each prompt, mask 0 on them, position ids count real tokens only;
      every row's new token sits at the last column.
right (GroupQueryAttention graphs): pads after each prompt; the mask has ones on each row's cached and
      new tokens, then zeros; positions are implied by the mask, so no position ids.
"""

from __future__ import annotations

import numpy as np

from artifact import contract

from .steps import StepInputs


class LeftPadding:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.mask: np.ndarray | None = None
        self.positions: np.ndarray | None = None

    def prefill(self, prompts: list[list[int]], reused: int, width: int | None = None) -> StepInputs:
        assert width is None, "the concat layout's masks grow with the cache"
        if reused:  # batch 1 continuing a cached conversation
            prompt = prompts[0]
            self.mask = np.ones((1, len(prompt)), np.int64)
            self.positions = np.arange(reused, len(prompt), dtype=np.int64)[None]
            return StepInputs(np.array([prompt[reused:]], dtype=np.int64), self.mask, self.positions)
        longest = max(len(prompt) for prompt in prompts)
        ids = np.full((len(prompts), longest), self.pad, dtype=np.int64)
        self.mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = prompt
            self.mask[row, longest - len(prompt):] = 1
        self.positions = np.maximum(self.mask.cumsum(axis=1) - 1, 0)
        return StepInputs(ids, self.mask, self.positions)

    def decode(self, tokens: list[int]) -> StepInputs:
        self.mask = self.next_decode_mask()
        self.positions = self.positions[:, -1:] + 1
        return StepInputs(np.array(tokens, dtype=np.int64)[:, None], self.mask, self.positions)

    def next_decode_mask(self) -> np.ndarray:
        """The mask the next decode step will have."""
        return np.concatenate([self.mask, np.ones((len(self.mask), 1), np.int64)], axis=1)


class RightPadding:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.lengths = np.zeros(0, np.int64)  # tokens each row holds after the step
        # set by the decode loop to the KV buffer's capacity: decode masks of one fixed width keep every
        # decode step's shapes identical, which CUDA-graph replay needs; GQA reads lengths from the ones
        self.decode_width: int | None = None

    def prefill(self, prompts: list[list[int]], reused: int, width: int | None = None) -> StepInputs:
        """`width` pads a fresh prompt further, to a captured graph's length (default: the longest row)."""
        if reused:
            self.lengths = np.array([len(prompts[0])], np.int64)
            return StepInputs(np.array([prompts[0][reused:]], dtype=np.int64), self._mask(), None)
        longest = width or max(len(prompt) for prompt in prompts)
        ids = np.full((len(prompts), longest), self.pad, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        self.lengths = np.array([len(prompt) for prompt in prompts], np.int64)
        return StepInputs(ids, self._mask(longest), None)

    def decode(self, tokens: list[int]) -> StepInputs:
        self.lengths = self.lengths + 1
        return StepInputs(np.array(tokens, dtype=np.int64)[:, None], self._mask(self.decode_width), None)

    def next_decode_mask(self) -> np.ndarray:
        """The mask the next decode step will have."""
        return self._mask(self.decode_width, self.lengths + 1)

    def _mask(self, width: int | None = None, lengths: np.ndarray | None = None) -> np.ndarray:
        lengths = self.lengths if lengths is None else lengths
        columns = width or lengths.max()
        return (np.arange(columns)[None, :] < lengths[:, None]).astype(np.int64)


PADDINGS = {contract.LEFT: LeftPadding, contract.RIGHT: RightPadding}
