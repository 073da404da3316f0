"""The defaults of llama-cpp-python 0.3.x, in one table.

Every keyword default of the facade's public methods comes from here, so the
facade answers a call that omits an argument exactly as llama-cpp-python
would. Values follow the peer's signatures; note the ones that differ
between methods (``temperature`` is 0.8 for completions and 0.2 for chat,
``max_tokens`` is 16 for completions and unlimited for chat).
"""

from __future__ import annotations

from typing import Any, Final

#: llama.cpp's "pick a random seed" value (``LLAMA_DEFAULT_SEED``).
LLAMA_DEFAULT_SEED: Final[int] = 0xFFFFFFFF

#: ``Llama(...)`` constructor keywords.
CONSTRUCTOR: Final[dict[str, Any]] = {
    "n_gpu_layers": 0,
    "split_mode": 1,
    "main_gpu": 0,
    "tensor_split": None,
    "vocab_only": False,
    "use_mmap": True,
    "use_mlock": False,
    "kv_overrides": None,
    "seed": LLAMA_DEFAULT_SEED,
    "n_ctx": 512,
    "n_batch": 512,
    "n_ubatch": 512,
    "n_threads": None,
    "n_threads_batch": None,
    "rope_scaling_type": -1,
    "pooling_type": -1,
    "attention_type": -1,
    "rope_freq_base": 0.0,
    "rope_freq_scale": 0.0,
    "yarn_ext_factor": -1.0,
    "yarn_attn_factor": 1.0,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
    "yarn_orig_ctx": 0,
    "logits_all": False,
    "embedding": False,
    "offload_kqv": True,
    "flash_attn": False,
    "op_offload": None,
    "swa_full": None,
    "no_perf": False,
    "last_n_tokens_size": 64,
    "lora_base": None,
    "lora_scale": 1.0,
    "lora_path": None,
    "numa": False,
    "chat_format": None,
    "chat_handler": None,
    "draft_model": None,
    "tokenizer": None,
    "type_k": None,
    "type_v": None,
    "spm_infill": False,
    "verbose": True,
}

#: ``create_completion`` / ``__call__``.
COMPLETION: Final[dict[str, Any]] = {
    "suffix": None,
    "max_tokens": 16,
    "temperature": 0.8,
    "top_p": 0.95,
    "min_p": 0.05,
    "typical_p": 1.0,
    "logprobs": None,
    "echo": False,
    "stop": [],
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repeat_penalty": 1.0,
    "top_k": 40,
    "stream": False,
    "seed": None,
    "tfs_z": 1.0,
    "mirostat_mode": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "model": None,
    "stopping_criteria": None,
    "logits_processor": None,
    "grammar": None,
    "logit_bias": None,
}

#: ``create_chat_completion``.
CHAT_COMPLETION: Final[dict[str, Any]] = {
    "functions": None,
    "function_call": None,
    "tools": None,
    "tool_choice": None,
    "temperature": 0.2,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "typical_p": 1.0,
    "stream": False,
    "stop": [],
    "seed": None,
    "response_format": None,
    "max_tokens": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repeat_penalty": 1.0,
    "tfs_z": 1.0,
    "mirostat_mode": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "model": None,
    "logits_processor": None,
    "grammar": None,
    "logit_bias": None,
    "logprobs": None,
    "top_logprobs": None,
}

#: ``sample`` and ``generate`` (the token-level layer).
SAMPLE: Final[dict[str, Any]] = {
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "typical_p": 1.0,
    "temp": 0.80,
    "repeat_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "tfs_z": 1.0,
    "mirostat_mode": 0,
    "mirostat_eta": 0.1,
    "mirostat_tau": 5.0,
    "penalize_nl": True,
    "logits_processor": None,
    "grammar": None,
}

#: ``embed``.
EMBED: Final[dict[str, Any]] = {"normalize": False, "truncate": True, "return_count": False}

#: ``tokenize`` / ``detokenize``.
TOKENIZE: Final[dict[str, Any]] = {"add_bos": True, "special": False}

#: ``LlamaRAMCache(capacity_bytes=...)``.
RAM_CACHE_CAPACITY: Final[int] = 2 << 30

#: Constructor keywords the facade accepts and ignores because they have no
#: meaning here (memory-layout hints, legacy keywords, or settings xybrid
#: picks itself). Anything else unknown is accepted too, as the peer does.
IGNORED_KEYWORDS: Final[frozenset[str]] = frozenset({
    "split_mode", "main_gpu", "tensor_split", "use_mlock", "offload_kqv", "op_offload",
    "swa_full", "no_perf", "numa", "spm_infill", "verbose", "logits_all", "n_threads_batch",
    "n_parts", "f16_kv", "low_vram", "mul_mat_q", "rope_freq_base", "rope_freq_scale",
    "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx",
    "rope_scaling_type", "attention_type", "lora_scale",
})

#: Chat format names of the peer that map onto xybrid's chat templates.
CHAT_FORMATS: Final[dict[str, str | None]] = {
    "chatml": "chatml",
    "llama-2": "llama2",
    "llama2": "llama2",
    "gemma": "gemma",
    "chat_template.default": None,  # the model's own template
}
