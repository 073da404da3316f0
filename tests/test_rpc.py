"""Models split across machines: real ``xybrid rpc-server`` processes on
127.0.0.1 (random ports), real models, the real extension.

Every server is its own process, started from a temporary folder (so the
installed package is imported) with one compute thread, and killed at the
end of the test that started it whatever happened. Waits are bounded.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig
from xybrid._native import _engine
from xybrid.errors import InvalidInputError, RemoteServerError
from xybrid.rpc import layer_placement, parse_endpoint, probe
from xybrid.testing.tiny_models import write_tiny_llama
from near_tie import assert_diverges_only_at_near_ties
from rpc_server import RpcServer, free_port

pytestmark = pytest.mark.skipif(not _engine.supports_rpc(), reason="built with -Drpc=false")

PROMPT = "The three primary colours are"


@pytest.fixture
def servers() -> Iterator[list[RpcServer]]:
    """Two running servers; more may be appended by the test (all are killed)."""
    with tempfile.TemporaryDirectory(prefix="xybrid-rpc-") as tmp:
        started: list[RpcServer] = []
        try:
            for _ in range(2):
                started.append(RpcServer(Path(tmp)).start())
            yield started
        finally:
            for s in started:
                s.kill()


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory, llama_cpp_dir: Path) -> Path:
    # F32 weights: the remote CPU runs the same kernels as the local one (no
    # repacked quantized layout), so results must be bit-identical.
    path = tmp_path_factory.mktemp("rpc") / "tiny-f32-4l.gguf"
    return write_tiny_llama(path, n_layer=4, dtype="f32", llama_cpp_dir=llama_cpp_dir)


GREEDY = GenerationConfig(max_tokens=24, temperature=0)


def _local_tokens(path: Path, prompt: str, cfg: GenerationConfig = GREEDY) -> list[int]:
    with LlamaCppBackend(LlmConfig(path, context_length=512, n_threads=2)) as b:
        return list(b.generate_raw(prompt, cfg).token_ids)


# --- configuration and probing ---------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "localhost", "host:", ":80", "host:0", "host:65536",
                                 "host:http", "[::1]:50052", "::1:50052", "a b:1", 5])
def test_bad_server_strings_name_the_server(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidInputError, match="rpc_servers"):
        LlmConfig(tmp_path / "m.gguf", rpc_servers=[bad])  # type: ignore[list-item]


def test_config_checks_servers_and_split(tmp_path: Path) -> None:
    p = tmp_path / "m.gguf"
    assert LlmConfig(p, rpc_servers="10.0.0.2:50052").rpc_servers == ("10.0.0.2:50052",)
    assert LlmConfig(p, rpc_servers=["a:1", "b:2"], tensor_split=[3, 1]).tensor_split == (3.0, 1.0)
    with pytest.raises(InvalidInputError, match="distinct"):
        LlmConfig(p, rpc_servers=["a:1", "a:1"])
    with pytest.raises(InvalidInputError, match="tensor_split is set but rpc_servers is not"):
        LlmConfig(p, tensor_split=[1.0])
    for split in ([-1, 2], [0, 0], [float("nan")], "1,1", [True]):
        with pytest.raises(InvalidInputError, match="tensor_split"):
            LlmConfig(p, rpc_servers=["a:1"], tensor_split=split)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="at most 16"):
        LlmConfig(p, rpc_servers=[f"h:{i}" for i in range(1, 18)])
    assert parse_endpoint("example.org:50052") == ("example.org", 50052)


def test_a_server_that_is_not_there_is_named(gemma_path: Path) -> None:
    port = free_port()
    with pytest.raises(RemoteServerError, match=f"127.0.0.1:{port} refused") as info:
        LlamaCppBackend(LlmConfig(gemma_path, rpc_servers=[f"127.0.0.1:{port}"]))
    assert info.value.endpoint == f"127.0.0.1:{port}"


def _fake_server(reply: bytes | None) -> tuple[socket.socket, threading.Thread]:
    """A TCP peer that reads the handshake and answers ``reply`` (None:
    says nothing and holds the connection), standing in for a server of
    another version or another protocol."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            if reply is not None:
                conn.sendall(reply)
            else:
                time.sleep(3)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return listener, t


@pytest.mark.parametrize("reply, message", [
    (struct.pack("<Q", 28) + bytes([99, 0, 0, 0]) + bytes(24), r"speaks protocol 99\.0\.0, this build 7\."),
    (struct.pack("<Q", 28) + bytes([7, 250, 0, 0]) + bytes(24), r"speaks protocol 7\.250\.0"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a ggml RPC server"),
    (b"", "closed the connection"),
    (None, "did not answer the handshake within 1 s: it serves one client at a time"),
])
def test_the_handshake_names_what_is_wrong(reply: bytes | None, message: str) -> None:
    listener, t = _fake_server(reply)
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(RemoteServerError, match=message):
            probe(endpoint, timeout=1.0)
    finally:
        listener.close()
        t.join(5)


def test_a_server_busy_with_another_client_is_reported(servers: list[RpcServer],
                                                       tiny_f32: Path) -> None:
    with LlamaCppBackend(LlmConfig(tiny_f32, context_length=256, n_threads=1,
                                   rpc_servers=[servers[0].endpoint])):
        with pytest.raises(RemoteServerError, match="one client at a time"):
            probe(servers[0].endpoint, timeout=1.0)
    probe(servers[0].endpoint)  # free again once the model is gone


# --- placement --------------------------------------------------------------------------

def test_layer_placement_rule() -> None:
    assert layer_placement(4, 0, [1, 1]) == [-1] * 5
    assert layer_placement(4, -1, [1, 1]) == [0, 0, 0, 1, 1]
    assert layer_placement(4, 3, [1, 1]) == [-1, -1, 0, 0, 1]
    assert layer_placement(4, 99, [3, 1]) == [0, 0, 0, 0, 1]
    assert layer_placement(4, -1, [0, 1]) == [1] * 5
    with pytest.raises(InvalidInputError):
        layer_placement(4, -1, [0, 0])


@pytest.mark.parametrize("gpu_layers, split", [(0, [1, 1]), (12, [1, 1]), (19, [3, 1]),
                                                (7, [1, 2])])
def test_placement_matches_what_llama_cpp_logs(servers: list[RpcServer], gemma_path: Path,
                                               gpu_layers: int, split: list[float]) -> None:
    """capabilities().placement is computed by xybrid.rpc; llama.cpp logs
    its own choice at debug level: they must agree layer by layer."""
    script = (
        "import json, sys\n"
        "from xybrid import LlamaCppBackend, LlmConfig\n"
        f"b = LlamaCppBackend(LlmConfig({str(gemma_path)!r}, context_length=256, n_threads=1,"
        f" gpu_layers={gpu_layers}, rpc_servers={[s.endpoint for s in servers]!r},"
        f" tensor_split={split!r}))\n"
        "print(json.dumps(b.capabilities().placement))\n")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, cwd=tmp, env={**os.environ, "XYBRID_LOG_LEVEL": "debug"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    placement = json.loads(proc.stdout.strip().splitlines()[-1])
    logged = re.findall(r"layer +(\d+) assigned to device (\S+),", proc.stderr)
    assert len(logged) == 19  # Gemma 3 270M: 18 layers and the output layer
    counts: dict[str, int] = {}
    for _, dev in logged:
        counts[dev] = counts.get(dev, 0) + 1
    ours = {p["device"]: p["layers"] for p in placement}
    assert ours == counts
    assert sum(ours.values()) == 19


def test_info_lists_devices_and_layers(servers: list[RpcServer], gemma_path: Path,
                                       tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xybrid", "info", str(gemma_path), "--json", "--rpc",
         ",".join(s.endpoint for s in servers), "--tensor-split", "1,1", "-ngl", "12"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    devices = json.loads(proc.stdout)["devices"]
    assert [(d["endpoint"], d["layers"]) for d in devices] == [
        (None, 7), (servers[0].endpoint, 6), (servers[1].endpoint, 6)]


def test_mem_caps_the_memory_a_server_reports(tmp_path: Path, tiny_f32: Path) -> None:
    server = RpcServer(tmp_path, None, "--mem", "300").start()
    try:
        model = _engine.Model(str(tiny_f32), gpu_layers=-1, rpc_servers=[server.endpoint])
        (dev,) = model.rpc_devices
        assert dev["memory_total"] == 300 << 20
        assert 0 < dev["memory_free"] <= 300 << 20
        model.close()
    finally:
        server.kill()


def test_cache_keeps_large_tensors_for_the_next_load(tmp_path: Path, gemma_path: Path) -> None:
    """--cache: tensors over ggml's 10 MiB threshold (Gemma's 170 MiB output
    matrix) are stored on the server's disk; the next load sends their
    hashes and the server takes them from there."""
    cache = tmp_path / "cache"
    server = RpcServer(tmp_path, None, "--cache", str(cache)).start()
    cfg = LlmConfig(gemma_path, context_length=256, n_threads=2, rpc_servers=[server.endpoint])
    one = GenerationConfig(max_tokens=6, temperature=0)
    try:
        with LlamaCppBackend(cfg) as b:
            first = b.generate_raw(PROMPT, one).text
        stored = [p for p in cache.rglob("*") if p.is_file()]
        assert stored and max(p.stat().st_size for p in stored) > 10 << 20
        with LlamaCppBackend(cfg) as b:
            assert b.generate_raw(PROMPT, one).text == first
    finally:
        server.kill()


# --- results ----------------------------------------------------------------------------

def test_f32_model_split_over_two_servers_and_the_cpu_is_identical(
        servers: list[RpcServer], tiny_f32: Path) -> None:
    prompts = [PROMPT, "Once upon a time", "def main():"]
    want = [_local_tokens(tiny_f32, p) for p in prompts]
    cfg = LlmConfig(tiny_f32, context_length=512, n_threads=2, gpu_layers=3,
                    rpc_servers=[s.endpoint for s in servers], tensor_split=[1, 1])
    with LlamaCppBackend(cfg) as b:
        assert [(p["endpoint"], p["layers"]) for p in b.capabilities().placement] == [
            (None, 2), (servers[0].endpoint, 2), (servers[1].endpoint, 1)]
        for p, w in zip(prompts, want):
            b.reset_cache()
            assert list(b.generate_raw(p, GREEDY).token_ids) == w
        # Streaming too.
        b.reset_cache()
        pieces = list(b.stream_raw(prompts[0], GREEDY))
        assert pieces[-1].output is not None
        assert list(pieces[-1].output.token_ids) == want[0]


def test_batched_requests_run_across_servers(servers: list[RpcServer], tiny_f32: Path) -> None:
    prompts = [PROMPT, "Once upon a time", "def main():", "The capital of France is"]
    want = [_local_tokens(tiny_f32, p) for p in prompts]
    cfg = LlmConfig(tiny_f32, context_length=1024, n_threads=2, parallel=4,
                    rpc_servers=[s.endpoint for s in servers])
    with LlamaCppBackend(cfg) as b:
        got = [list(o.token_ids) for o in b.generate_batch(prompts, GREEDY, raw=True)]
    assert got == want


def test_gemma_split_matches_local_or_diverges_at_a_near_tie(
        servers: list[RpcServer], gemma_path: Path) -> None:
    """Gemma 3 270M Q4_K_M: locally, llama.cpp repacks the quantized weights
    for its fastest CPU kernels; an RPC server keeps them as they are in the
    file and runs the plain kernels. Results agree to rounding, so greedy
    decoding gives the local tokens or leaves them only where the two best
    logits were nearly tied."""
    prompts = [PROMPT, "Once upon a time", "The capital of France is"]
    want = [_local_tokens(gemma_path, p) for p in prompts]
    cfg = LlmConfig(gemma_path, context_length=512, n_threads=2, gpu_layers=12,
                    rpc_servers=[s.endpoint for s in servers], tensor_split=[1, 1])
    with LlamaCppBackend(cfg) as b:
        got = []
        for p in prompts:
            b.reset_cache()
            got.append(list(b.generate_raw(p, GREEDY).token_ids))
    model = _engine.Model(str(gemma_path))
    try:
        assert_diverges_only_at_near_ties(model, prompts, want, got, n_ctx=512)
    finally:
        model.close()


# --- failures ---------------------------------------------------------------------------

def test_a_server_killed_mid_stream_is_a_typed_error_and_reload_works(
        servers: list[RpcServer], gemma_path: Path) -> None:
    assert _engine.rpc_recovers()
    victim = servers[1]
    cfg = LlmConfig(gemma_path, context_length=512, n_threads=2,
                    rpc_servers=[s.endpoint for s in servers])
    want = _local_tokens(gemma_path, PROMPT, GenerationConfig(max_tokens=8, temperature=0))
    b = LlamaCppBackend(cfg)
    try:
        n = 0
        with pytest.raises(RemoteServerError, match=f"{victim.endpoint} failed during decode") as info:
            for _ in b.stream_raw("Once upon a time", GenerationConfig(max_tokens=200, temperature=0)):
                n += 1
                if n == 3:
                    victim.kill()
        assert info.value.endpoint == victim.endpoint
        assert n < 200
        # The model is unusable until it is loaded again, and says so.
        with pytest.raises(RemoteServerError, match="load it again"):
            b.generate_raw(PROMPT)
        # A load while the server is still down names it.
        with pytest.raises(RemoteServerError, match=f"{victim.endpoint} refused"):
            b.load(cfg)
        # Back on the same port: the backend loads and answers again.
        servers.append(RpcServer(victim.workdir, victim.port).start())
        b.load(cfg)
        out = b.generate_raw(PROMPT, GenerationConfig(max_tokens=8, temperature=0))
        assert out.text  # exactness across the split is the test above
        assert len(out.token_ids) == len(want)
    finally:
        b.unload()


def test_batched_requests_all_end_typed_when_a_server_dies(
        servers: list[RpcServer], tiny_f32: Path) -> None:
    cfg = LlmConfig(tiny_f32, context_length=1024, n_threads=2, parallel=3,
                    rpc_servers=[s.endpoint for s in servers])
    with LlamaCppBackend(cfg) as b:
        streams = [b.stream_raw(p, GenerationConfig(max_tokens=400, temperature=0, min_p=0))
                   for p in (PROMPT, "Once upon a time", "def main():")]
        for s in streams:
            next(s)
        servers[0].kill()
        for s in streams:
            with pytest.raises(RemoteServerError):
                for _ in s:
                    pass
        with pytest.raises(RemoteServerError, match="load it again"):
            b.generate_raw(PROMPT)


# --- the command line -----------------------------------------------------------------

def test_rpc_server_help_warns_about_security(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "xybrid", "rpc-server", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "no authentication and no encryption" in text
    assert "127.0.0.1" in text


def test_rpc_server_on_a_taken_port_is_one_line_error(servers: list[RpcServer],
                                                      tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xybrid", "rpc-server", "--port", str(servers[0].port)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("xybrid: error:")]
    assert errors and f"cannot listen on 127.0.0.1:{servers[0].port}" in errors[0]
    assert "Traceback" not in proc.stderr


def test_generate_with_rpc_flag(servers: list[RpcServer], tiny_f32: Path, tmp_path: Path) -> None:
    args = ["generate", PROMPT, "--model", str(tiny_f32), "-n", "12", "--temperature", "0",
            "-c", "256", "-t", "1"]
    local = subprocess.run([sys.executable, "-m", "xybrid", *args], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    split = subprocess.run([sys.executable, "-m", "xybrid", *args, "--rpc",
                            ",".join(s.endpoint for s in servers)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert local.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == local.stdout and len(local.stdout) > len(PROMPT)


def test_chat_with_rpc_flag(servers: list[RpcServer], tmp_path: Path) -> None:
    from xybrid.default_model import default_chat_model_path

    proc = subprocess.run(
        [sys.executable, "-m", "xybrid", "chat", "--model", str(default_chat_model_path()),
         "-n", "8", "--temperature", "0", "-c", "512", "-t", "1",
         "--rpc", ",".join(s.endpoint for s in servers), "--tensor-split", "1,1"],
        input="Say hello.\n/exit\n", capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_cli_with_a_down_server_is_one_line_error(tiny_f32: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "xybrid", "generate", "hi", "--model", str(tiny_f32),
         "--rpc", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"xybrid: error: RPC server 127.0.0.1:{port} refused the connection")


def test_serve_with_rpc_answers_the_openai_client(servers: list[RpcServer]) -> None:
    openai = pytest.importorskip("openai")
    from server_support import API_KEY, start_server

    server = start_server("--rpc", ",".join(s.endpoint for s in servers), "--parallel", "2")
    try:
        client = openai.OpenAI(base_url=server.api_url, api_key=API_KEY)
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8, temperature=0)
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0
    finally:
        assert server.stop() == 0
