"""Classification and embedding artifacts (contract.TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION,
FEATURE_EXTRACTION): padded batches in, scores or vectors out.

One run per batch, rows padded on the right with the head's pad id (a text-classification graph reads each
row's rightmost token that is not that id, as transformers does; positions count from 0 in every row, so a
row scores as it does alone). Scores follow transformers' pipelines: sigmoid for multi-label heads and
single-logit heads, none for regression, softmax otherwise. Embeddings are the graph's sentence_embedding:
each row's last real token's final hidden state, L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from artifact import contract

from .errors import RuntimeInputError
from .padding import RightPadding
from .sampling import softmax
from .session import GraphSession


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class TokenLabel:
    """token-classification: one token of the text, its best label and that label's score."""

    token_id: int
    token: str
    label: str
    score: float


def classification_logits(session: GraphSession, manifest: contract.Manifest, prompts: list[list[int]]) -> list[np.ndarray]:
    """Each prompt's fp32 logits: [labels] (text-classification) or [its tokens, labels] (token-classification)."""
    head = manifest.head
    if head is None:
        raise RuntimeInputError(f"this artifact's task is {manifest.task}; classify needs a text- or "
                                "token-classification artifact (export a *ForSequenceClassification or "
                                "*ForTokenClassification checkpoint)")
    if manifest.task == contract.TEXT_CLASSIFICATION and head.pad_token_id is None and len(prompts) > 1:
        raise RuntimeInputError("Cannot handle batch sizes > 1 if no padding token is defined (config.json has no "
                                "pad_token_id, as transformers says); classify one text at a time, or set "
                                "pad_token_id in config.json and re-export")
    pad = head.pad_token_id if head.pad_token_id is not None else 0
    (logits,) = session.session.run([contract.LOGITS], padded_batch(manifest, prompts, pad))
    if manifest.task == contract.TOKEN_CLASSIFICATION:
        return [logits[row, : len(prompt)] for row, prompt in enumerate(prompts)]
    return list(logits)


def embeddings(session: GraphSession, manifest: contract.Manifest, prompts: list[list[int]]) -> np.ndarray:
    """[prompts, hidden] fp32: each prompt's sentence embedding (last real token, L2-normalised)."""
    if manifest.task != contract.FEATURE_EXTRACTION:
        raise RuntimeInputError(f"this artifact's task is {manifest.task}; embed needs a feature-extraction artifact "
                                "(export a Qwen2Model checkpoint, or any Qwen2 checkpoint with --task feature-extraction)")
    (vectors,) = session.session.run([contract.SENTENCE_EMBEDDING], padded_batch(manifest, prompts, 0))
    return vectors


def padded_batch(manifest: contract.Manifest, prompts: list[list[int]], pad: int) -> dict[str, np.ndarray]:
    """The graph's inputs for `prompts`, padded on the right with `pad`; refused when empty or past the context."""
    context = manifest.model.context_length
    if not prompts or any(not prompt for prompt in prompts):
        raise RuntimeInputError("every text needs at least one token")
    longest = max(map(len, prompts))
    if longest > context:
        raise RuntimeInputError(f"a text of {longest} tokens is past the model's context length {context}")
    inputs = RightPadding(pad).prefill(prompts, 0)
    return {contract.INPUT_IDS: inputs.input_ids, contract.ATTENTION_MASK: inputs.attention_mask}


def scores(logits: np.ndarray, head: contract.HeadFacts) -> np.ndarray:
    """Scores from logits over the last axis, as transformers' classification pipelines apply them."""
    if head.problem_type == "regression":
        return logits
    if head.problem_type == "multi_label_classification" or len(head.labels) == 1:
        return 1 / (1 + np.exp(-logits))
    return softmax(logits)


def ranked(row_scores: np.ndarray, head: contract.HeadFacts, top_k: int | None) -> list[LabelScore]:
    """The labels by score, best first; the first `top_k` (None: all)."""
    order = np.argsort(-row_scores, kind="stable")[:top_k]
    return [LabelScore(head.labels[i], float(row_scores[i])) for i in order]
