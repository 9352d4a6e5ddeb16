"""The one shape of a fusion pass, as in onnxscript's rewriter: find -> check -> build.

    find(graph, facts)             -> candidates (subgraphs located by module scope or op type)
    check(graph, candidate, facts) -> a small frozen match with what build needs, or a reason (str)
    build(graph, matches, facts)   -> the facts after the pass (the same, or with what it established)
    expected(facts)                -> how many times it must fire for this model

Nothing is stored on the pass between the steps; graphs/pipeline.py runs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import onnx_ir as ir

from .facts import PassFacts


@dataclass(frozen=True)
class Fusion:
    name: str
    expected: Callable[[PassFacts], int]
    find: Callable[[ir.Graph, PassFacts], list[Any]]
    check: Callable[[ir.Graph, Any, PassFacts], Any]
    build: Callable[[ir.Graph, list[Any], PassFacts], PassFacts]
