"""The peer contestant: llama-cpp-python, through its user-level API.

Runs in the llama-cpp-python venv (bench/.cache/venv-llama-cpp-python).
Variants:

- ``completion``: ``Llama.create_completion(prompt_ids, max_tokens=N)``.
- ``completion-stream``: the same with ``stream=True``, iterating the chunks.

Fairness notes (see bench/README.md): the prompt is passed as token ids (a
list prompt is used as is, no BOS added); the sampler arguments are mapped so
that llama-cpp-python builds the same llama.cpp chain as xybrid and the C
loop (its extra stages are set to their neutral values: min_p=0, typical_p=1,
repeat_penalty=1, which llama.cpp skips); ``seed`` is passed per call.

A non-streaming call shows its caller no first-token time, so its
``t_first_ns`` is the call's start plus llama.cpp's own prompt-evaluation
time (``llama_perf_context``): the Python work before the prefill is then
counted as decode time, which can only lower this variant's decode rate by
a hair (a fraction of a millisecond over the run).
"""

from __future__ import annotations

from typing import Any

from _common import Run, load_spec, now_ns, rss_kb, serve

RSS_START = rss_kb()

import llama_cpp  # noqa: E402
from llama_cpp import Llama  # noqa: E402

_shared: dict[str, Any] = {}


def _llama(spec: dict[str, Any]) -> Llama:
    if "llm" not in _shared:
        _shared["llm"] = Llama(
            spec["model"], n_ctx=spec["n_ctx"], n_batch=spec["n_batch"], n_ubatch=spec["n_batch"],
            n_threads=spec["threads"], n_threads_batch=spec["threads"], flash_attn=spec["flash_attn"],
            n_gpu_layers=0, use_mmap=True, verbose=False)
    return _shared["llm"]


class Completion:
    streaming = False

    def __init__(self, spec: dict[str, Any]) -> None:
        self.llm = _llama(spec)
        self.facts = {"llama_cpp_python_version": llama_cpp.__version__}
        s = spec["sampler"]
        self.kwargs = dict(temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                           min_p=s["min_p"], typical_p=1.0, repeat_penalty=1.0,
                           frequency_penalty=0.0, presence_penalty=0.0, seed=s["seed"])
        if spec.get("grammar"):
            self.kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(spec["grammar"], verbose=False)

    def _new_tokens(self, n_prompt: int) -> list[int]:
        # The tokens that went through llama_decode after the prompt (all
        # generated tokens but the last one, which is never decoded).
        return [int(t) for t in self.llm.input_ids[n_prompt:self.llm.n_tokens]]

    def generate(self, tokens: list[int], n_predict: int) -> Run:
        self.llm.reset()
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        t0 = now_ns()
        out = self.llm.create_completion(tokens, max_tokens=n_predict, **self.kwargs)
        t1 = now_ns()
        perf = llama_cpp.llama_perf_context(self.llm.ctx)
        first = t0 + int(perf.t_p_eval_ms * 1e6)
        n = int(out["usage"]["completion_tokens"])
        return Run(t0, first, t1, n, self._new_tokens(len(tokens)), 1, out["choices"][0]["finish_reason"])

    def turn1(self, prefix: list[int]) -> None:
        self.llm.reset()
        self.llm.create_completion(prefix, max_tokens=1, **self.kwargs)

    def _complete_one(self, tokens: list[int]) -> int:
        t0 = now_ns()
        self.llm.create_completion(tokens, max_tokens=1, **self.kwargs)
        return t0

    def turn2(self, tokens: list[int], prefix_len: int, reuse: bool) -> int:
        """TTFT of the next turn. With reuse, llama-cpp-python's own prefix
        matching in Llama.generate keeps the cached prefix and decodes the
        rest; cleared = Llama.reset() first, so all of it is decoded."""
        if reuse:
            # Bring the cache back to exactly the prefix (untimed), as after turn 1.
            if self.llm.n_tokens != prefix_len:
                self.llm.create_completion(tokens[:prefix_len], max_tokens=1, **self.kwargs)
            t0 = now_ns()
            self._call(tokens)
        else:
            t0 = now_ns()
            self.llm.reset()
            self._call(tokens)
        return self.t_first - t0

    def _call(self, tokens: list[int]) -> None:
        self.llm.create_completion(tokens, max_tokens=1, **self.kwargs)
        self.t_first = now_ns()


class CompletionStream(Completion):
    streaming = True

    def generate(self, tokens: list[int], n_predict: int) -> Run:
        self.llm.reset()
        chunk_ns: list[int] = []
        t0 = now_ns()
        finish = ""
        for chunk in self.llm.create_completion(tokens, max_tokens=n_predict, stream=True, **self.kwargs):
            chunk_ns.append(now_ns())
            finish = chunk["choices"][0]["finish_reason"] or finish
        t1 = now_ns()
        # The stream carries no token count. Every generated token went
        # through llama_decode except the last one when the length limit
        # ended the stream (after an end-of-generation token, all did).
        new = self._new_tokens(len(tokens))
        first = chunk_ns[0] if chunk_ns else t1
        return Run(t0, first, t1, len(new) + (finish == "length"), new, len(chunk_ns), finish)

    def _call(self, tokens: list[int]) -> None:
        self.t_first = 0
        for _chunk in self.llm.create_completion(tokens, max_tokens=1, stream=True, **self.kwargs):
            if not self.t_first:
                self.t_first = now_ns()
        if not self.t_first:
            self.t_first = now_ns()


VARIANTS: dict[str, type] = {
    "completion": Completion,
    "completion-stream": CompletionStream,
}


def main() -> None:
    spec = load_spec()
    serve(spec, "llama-cpp-python", lambda name, s: VARIANTS[name](s), spec["variants"], RSS_START)


if __name__ == "__main__":
    main()
