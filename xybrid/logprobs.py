"""Per-token log-probabilities: carrying the engine's numbers into results.

The engine collects them in C during the decode loop (see
``xybrid/_native/_logprobs.pxi``); this module only copies them from a
native ``GenerationResult`` onto a :class:`GenerationOutput`, and holds the
pure helpers the OpenAI-shaped layers (server, llama-cpp-python facade) share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from xybrid.types import GenerationOutput

__all__ = ["attach_logprobs", "log_softmax"]


def attach_logprobs(output: GenerationOutput, result: Any) -> GenerationOutput:
    """``output`` with the logprobs of the native ``result`` (unchanged when
    none were collected)."""
    lps = getattr(result, "logprobs", None)
    if lps is None:
        return output
    top = tuple(tuple((int(i), float(lp)) for i, lp in row) for row in result.top_logprobs)
    return dataclasses.replace(output, logprobs=tuple(float(x) for x in lps), top_logprobs=top)


def log_softmax(logits: Sequence[float]) -> list[float]:
    """Reference log-softmax in plain Python (float64), for checks and for
    callers that hold a logits row."""
    m = max(logits)
    total = math.fsum(math.exp(x - m) for x in logits)
    lse = m + math.log(total)
    return [x - lse for x in logits]
