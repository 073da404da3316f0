"""LangChain's llama.cpp integrations run on xybrid after install_llama_cpp():
langchain_community.llms.LlamaCpp and chat_models.ChatLlamaCpp, invoke and
stream, on the default model (Gemma 3 270M, its chat template inferred)."""

from __future__ import annotations

import sys

import pytest

from xybrid import GenerationConfig, LlmConfig
from xybrid.compat import install_llama_cpp, uninstall_llama_cpp
from xybrid.llama_cpp_backend import LlamaCppBackend

PROMPT = "The three primary colours are"


@pytest.fixture(scope="module", autouse=True)
def aliased():  # type: ignore[no-untyped-def]
    previous = sys.modules.get("llama_cpp")
    install_llama_cpp(force=True)
    yield
    uninstall_llama_cpp()
    if previous is not None:
        sys.modules["llama_cpp"] = previous


@pytest.fixture(scope="module")
def backend(gemma_path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(LlmConfig(gemma_path, context_length=512, n_threads=1)) as b:
        yield b


def test_llms_llamacpp_invoke_and_stream(gemma_path, backend) -> None:  # type: ignore[no-untyped-def]
    from langchain_community.llms import LlamaCpp

    from xybrid.compat.llama_cpp import Llama

    llm = LlamaCpp(model_path=str(gemma_path), n_ctx=512, n_threads=1, max_tokens=12,
                   temperature=0.0, repeat_penalty=1.0, verbose=False, streaming=False)
    assert isinstance(llm.client, Llama)
    text = llm.invoke(PROMPT)
    tokens = backend.model.tokenize(PROMPT, add_special=True, parse_special=True)
    want = backend.generate_raw(tokens, GenerationConfig.greedy(max_tokens=12))
    assert text == want.text
    pieces = list(llm.stream(PROMPT))
    assert len(pieces) >= 2
    assert "".join(pieces) == text
    assert llm.get_num_tokens(PROMPT) == len(tokens)
    cut = llm.invoke(PROMPT, stop=["."])
    assert "." not in cut and text.startswith(cut)
    llm.client.close()


def test_chat_llamacpp_invoke_and_stream(gemma_path, backend) -> None:  # type: ignore[no-untyped-def]
    from langchain_community.chat_models import ChatLlamaCpp
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    chat = ChatLlamaCpp(model_path=str(gemma_path), n_ctx=512, n_threads=1, max_tokens=16,
                        temperature=0.0, repeat_penalty=1.0, verbose=False)
    messages = [SystemMessage("You answer briefly."), HumanMessage("Name a colour.")]
    reply = chat.invoke(messages)
    assert isinstance(reply, AIMessage) and reply.content
    want = backend.generate([{"role": "system", "content": "You answer briefly."},
                             {"role": "user", "content": "Name a colour."}],
                            GenerationConfig.greedy(max_tokens=16))
    assert reply.content == want.text
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    chunks = list(chat.stream(messages))
    assert len(chunks) >= 2
    assert "".join(str(c.content) for c in chunks) == reply.content
    assert any((c.response_metadata or {}).get("finish_reason") for c in chunks)
    chat.client.close()


def test_chat_llamacpp_bind_tools(gemma_path) -> None:  # type: ignore[no-untyped-def]
    from langchain_community.chat_models import ChatLlamaCpp
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Weather of a city."""
        return "sunny"

    chat = ChatLlamaCpp(model_path=str(gemma_path), n_ctx=512, n_threads=1, max_tokens=60,
                        temperature=0.0, verbose=False)
    bound = chat.bind_tools([get_weather],
                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = bound.invoke("What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    chat.client.close()
