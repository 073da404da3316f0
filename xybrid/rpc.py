"""Models split across machines: ggml's RPC backend, made safe to use.

A remote ``xybrid rpc-server`` holds some of a model's layers and computes
them; the local process holds the rest and drives the decode loop. This
module is the Python side of that path:

- :func:`parse_endpoint` checks a "host:port" string;
- :func:`probe` connects to a server and runs the protocol handshake
  itself, with a timeout, before ggml does (ggml's client has no timeout and
  no way to report a refused connection), so a server that is down, busy
  with another client, or speaks another protocol version is a
  :class:`~xybrid.errors.RemoteServerError` naming its address;
- :func:`layer_placement` says which device holds each layer (a pure
  function: the rule llama.cpp applies when it loads a model), and
  :func:`device_layers` how many each device of a loaded model holds;
- :func:`serve` runs a server in this process (``xybrid rpc-server``).

Security: the RPC protocol has no authentication and no encryption. Anyone
who can reach a server's port can read and write its memory and run
computations on it. Bind servers to 127.0.0.1 (the default) or to a private,
trusted network only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xybrid.errors import InvalidInputError, RemoteServerError, XybridError

__all__ = [
    "DEFAULT_PORT",
    "SECURITY_WARNING",
    "device_layers",
    "layer_placement",
    "parse_endpoint",
    "parse_server_list",
    "parse_tensor_split",
    "probe",
    "remote_layers",
    "serve",
    "ServerInfo",
]

DEFAULT_PORT = 50052
PROBE_TIMEOUT_S = 5.0

SECURITY_WARNING = (
    "The RPC protocol has no authentication and no encryption: anyone who can reach "
    "the port can read and write this server's memory and use its CPU. Keep it on "
    "127.0.0.1 or a trusted private network."
)

# The handshake, as ggml-rpc sends it: one command byte, the request's size
# (u64, little-endian) and the request (transport capabilities, 24 bytes,
# zero for plain TCP); the reply is its size (u64) and major, minor, patch,
# a padding byte and the server's capabilities.
_CMD_HELLO = 14
_CAPS_SIZE = 24
_HELLO_REPLY_SIZE = 4 + _CAPS_SIZE


@dataclass(frozen=True)
class ServerInfo:
    """What a server said in its handshake."""

    endpoint: str
    protocol: tuple[int, int, int]


def parse_endpoint(text: object) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; a typed error naming the problem
    otherwise. IPv6 addresses are not accepted (ggml splits at the last
    colon and resolves IPv4 names only)."""
    if not isinstance(text, str) or not text:
        raise InvalidInputError(f"an RPC server must be a 'host:port' string, got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidInputError(f"RPC server {text!r} is not 'host:port'")
    if ":" in host or host.startswith("["):
        raise InvalidInputError(f"RPC server {text!r}: IPv6 addresses are not supported")
    if any(c.isspace() for c in host):
        raise InvalidInputError(f"RPC server {text!r}: the host has white space")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"RPC server {text!r}: port {port} is outside 1..65535")
    return host, port


def parse_server_list(text: str | None) -> tuple[str, ...]:
    """``"host:port,host:port"`` (a flag's value) -> the endpoints, checked."""
    if not text:
        return ()
    servers = tuple(part.strip() for part in text.split(","))
    for server in servers:
        parse_endpoint(server)
    return servers


def parse_tensor_split(text: str | None) -> tuple[float, ...]:
    """``"3,1"`` (a flag's value) -> the weights."""
    if not text:
        return ()
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidInputError(
            f"tensor split {text!r} is not comma-separated numbers (e.g. 3,1)") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> ServerInfo:
    """Handshake with the server at ``endpoint``; raise
    :class:`RemoteServerError` unless it answers, within ``timeout``
    seconds, with a protocol version this build speaks.

    A server serves one client at a time: while another process is
    connected, this times out with a message that says so.
    """
    from xybrid._native import _engine

    host, port = parse_endpoint(endpoint)
    ours = tuple(int(v) for v in _engine.RPC_PROTOCOL)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise RemoteServerError(
            f"RPC server {endpoint} refused the connection: is `xybrid rpc-server` running "
            f"there, on that port?", endpoint=endpoint) from None
    except socket.gaierror as exc:
        raise RemoteServerError(f"RPC server {endpoint}: cannot resolve {host!r} ({exc.strerror})",
                                endpoint=endpoint) from None
    except TimeoutError:
        raise RemoteServerError(f"RPC server {endpoint} did not accept a connection within "
                                f"{timeout:g} s", endpoint=endpoint) from None
    except OSError as exc:
        raise RemoteServerError(f"RPC server {endpoint}: cannot connect ({exc.strerror or exc})",
                                endpoint=endpoint) from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            head = _recv_exact(sock, 8)
            reply = _recv_exact(sock, _HELLO_REPLY_SIZE) if len(head) == 8 else b""
        except TimeoutError:
            raise RemoteServerError(
                f"RPC server {endpoint} accepted the connection but did not answer the handshake "
                f"within {timeout:g} s: it serves one client at a time, and another may be "
                f"connected", endpoint=endpoint) from None
        except OSError as exc:
            raise RemoteServerError(f"RPC server {endpoint}: the handshake failed "
                                    f"({exc.strerror or exc})", endpoint=endpoint) from None
    if len(head) < 8 or struct.unpack("<Q", head)[0] != _HELLO_REPLY_SIZE or len(reply) < 3:
        raise RemoteServerError(
            f"{endpoint} closed the connection or answered the handshake with something else: "
            f"not a ggml RPC server of protocol {ours[0]}.x", endpoint=endpoint)
    theirs = (reply[0], reply[1], reply[2])
    # ggml's rule: the same major version, and no newer minor than ours.
    if theirs[0] != ours[0] or theirs[1] > ours[1]:
        raise RemoteServerError(
            f"RPC server {endpoint} speaks protocol {'.'.join(map(str, theirs))}, this build "
            f"{'.'.join(map(str, ours))}: run the same xybrid (or llama.cpp) version on both ends",
            endpoint=endpoint)
    return ServerInfo(endpoint=endpoint, protocol=theirs)


def layer_placement(n_layer: int, gpu_layers: int, weights: Sequence[float]) -> list[int]:
    """The device index holding each of the ``n_layer + 1`` layers (the
    repeating layers, then the output layer); -1 is the local CPU.

    llama.cpp's rule: the last ``gpu_layers`` layers (-1: all) are
    offloaded, split in order over the devices in proportion to
    ``weights`` (the tensor split, or each device's free memory); the input
    embeddings always stay on the CPU.
    """
    n_all = n_layer + 1
    n_gpu = n_all if gpu_layers < 0 else min(gpu_layers, n_all)
    if not weights or n_gpu == 0:
        return [-1] * n_all
    total = float(sum(weights))
    if total <= 0:
        raise InvalidInputError("the tensor split weights sum to zero")
    bounds: list[float] = []
    acc = 0.0
    for w in weights:
        acc += float(w)
        bounds.append(acc / total)
    start = max(n_all - n_gpu, 0)
    out: list[int] = []
    for il in range(n_all):
        if il < start:
            out.append(-1)
            continue
        frac = float(il - start) / n_gpu
        # The first device whose cumulative bound is above frac (upper_bound).
        dev = next((i for i, b in enumerate(bounds) if b > frac), len(bounds) - 1)
        out.append(dev)
    return out


def remote_layers(gpu_layers: int) -> int:
    """What ``gpu_layers`` means with RPC servers: 0 (the default) puts
    every layer on them, since they are the point (-1 for llama.cpp)."""
    return gpu_layers or -1


def device_layers(n_layer: int, gpu_layers: int, devices: Sequence[Mapping[str, Any]],
                  tensor_split: Sequence[float] = ()) -> list[dict[str, Any]]:
    """The local CPU, then each remote device of a model (``Model.rpc_devices``),
    with its endpoint, the free memory it reported at load and how many
    layers it holds (the output layer counts as one)."""
    weights = list(tensor_split) or [d["memory_free"] for d in devices]
    where = layer_placement(n_layer, remote_layers(gpu_layers), weights)
    return [
        {"device": "CPU" if i < 0 else devices[i]["name"],
         "endpoint": None if i < 0 else devices[i]["endpoint"],
         "memory_free": None if i < 0 else devices[i]["memory_free"],
         "layers": where.count(i)}
        for i in range(-1, len(devices))]


def _check_bindable(host: str, port: int) -> None:
    """Fail now, with the reason, if the server could not bind the port."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidInputError(f"--host {host!r}: {exc.strerror}") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(infos[0][4])
        except OSError as exc:
            raise XybridError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, threads: int = 0,
          mem_mib: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Run an RPC server for this machine's CPU until the process is
    stopped (SIGINT or SIGTERM end it; this returns only if the server
    could not start, with an error).

    ``threads=0`` uses every core. ``mem_mib > 0`` caps the memory the
    server reports (clients split layers by it). ``cache_dir`` keeps
    tensors sent to the server on disk, so a client that loads the same
    model again sends only their hashes.
    """
    from xybrid._native import _engine

    if not _engine.supports_rpc():
        raise XybridError("this build of xybrid has no RPC backend (it was built with -Drpc=false)")
    parse_endpoint(f"{host}:{port}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise InvalidInputError(f"threads must be an integer >= 0, got {threads!r}")
    if isinstance(mem_mib, bool) or not isinstance(mem_mib, int) or not 0 <= mem_mib < 1 << 40:
        raise InvalidInputError(f"mem_mib must be an integer >= 0, got {mem_mib!r}")
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
    _check_bindable(host, port)
    if not _is_loopback(host):
        print(f"warning: serving on {host}: {SECURITY_WARNING}", file=sys.stderr)
    n_threads = threads or os.cpu_count() or 1
    failed: list[BaseException] = []

    def run() -> None:
        try:
            _engine.rpc_serve(f"{host}:{port}", cache_dir, n_threads, mem_mib << 20)
        except BaseException as exc:  # reported by the main thread
            failed.append(exc)

    # The server blocks in C for good; on a thread of its own the main
    # thread still takes SIGINT/SIGTERM and ends the process.
    worker = threading.Thread(target=run, name="xybrid-rpc-server", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if failed:
        raise failed[0]
    raise XybridError(f"the RPC server on {host}:{port} stopped: it could not listen there")
