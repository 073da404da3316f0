"""Editing and mutating GGUF files for the malformed-file tests.

Edits work on the raw bytes with the layout :func:`xybrid.gguf_check.read_gguf`
reports: metadata entries can be replaced, retyped, added or removed (the
header is rebuilt and the data section moved to the next aligned offset, so
tensor offsets stay valid), and fields of the tensor table can be
overwritten in place. :class:`Worker` loads and uses files in a child
process, so that an abort or a segfault in llama.cpp is seen and reported
instead of ending the test run.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from xybrid.gguf_check import GGUFFile, ValueType, read_gguf

HERE = Path(__file__).resolve().parent

_FORMATS = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<B",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}
_RANGES = {
    ValueType.UINT8: (0, 255), ValueType.INT8: (-128, 127), ValueType.UINT16: (0, 65535),
    ValueType.INT16: (-32768, 32767), ValueType.UINT32: (0, 2**32 - 1), ValueType.INT32: (-2**31, 2**31 - 1),
    ValueType.UINT64: (0, 2**64 - 1), ValueType.INT64: (-2**63, 2**63 - 1), ValueType.BOOL: (0, 1),
}


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _scalar(vtype: int, value: Any) -> bytes:
    if vtype == ValueType.STRING:
        return _string(value)
    if vtype in _RANGES:
        lo, hi = _RANGES[vtype]
        value = min(max(int(value), lo), hi)
    return struct.pack(_FORMATS[vtype], value)


def encode_value(vtype: int, value: Any, array_type: int | None = None) -> bytes:
    """Type field and value of a metadata entry, as stored."""
    out = struct.pack("<I", vtype)
    if vtype == ValueType.ARRAY:
        assert array_type is not None
        items = list(value)
        out += struct.pack("<IQ", array_type, len(items))
        return out + b"".join(_scalar(array_type, v) for v in items)
    return out + _scalar(vtype, value)


def _entries(data: bytes, f: GGUFFile) -> list[tuple[str, bytes]]:
    """(key, raw entry bytes) of every metadata entry, in file order."""
    ordered = sorted(f.kv.values(), key=lambda e: e.offset)
    ends = [e.offset for e in ordered[1:]] + [f.tensor_table_offset]
    return [(e.key, data[e.offset:end]) for e, end in zip(ordered, ends)]


def rebuild(data: bytes, edits: dict[str, bytes | None], *, f: GGUFFile | None = None,
            path: str = "<bytes>") -> bytes:
    """``data`` with metadata entries replaced: ``edits`` maps a key to its
    new type-and-value bytes (see :func:`encode_value`), or to None to drop
    it; keys not in the file are added at the end."""
    if f is None:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"xybrid-rebuild-{os.getpid()}.gguf"
        tmp.write_bytes(data)
        try:
            f = read_gguf(tmp)
        finally:
            tmp.unlink()
    entries = _entries(data, f)
    seen = set()
    out_entries = []
    for key, raw in entries:
        if key in edits:
            seen.add(key)
            new = edits[key]
            if new is None:
                continue
            raw = _string(key) + new
        out_entries.append(raw)
    for key, new in edits.items():
        if key not in seen and new is not None:
            out_entries.append(_string(key) + new)
    header = bytearray(data[:24])
    struct.pack_into("<Q", header, 16, len(out_entries))
    body = bytes(header) + b"".join(out_entries) + data[f.tensor_table_offset:f.header_size]
    align = f.alignment
    new_align = edits.get("general.alignment")
    if new_align is not None and len(new_align) == 8:
        (vt, a) = struct.unpack("<II", new_align)
        if vt == ValueType.UINT32 and a > 0 and a & (a - 1) == 0:
            align = a
    pad = (-len(body)) % align
    return body + b"\0" * pad + data[f.data_offset:]


def tensor_field_offsets(f: GGUFFile, name: str) -> dict[str, int]:
    """File offsets of a tensor description's fields: ``n_dims``,
    ``dim0``.. ``dim3``, ``type`` and ``offset``."""
    t = f.tensors[name]
    name_len = len(t.name.encode("utf-8"))
    pos = t.info_offset + 8 + name_len
    out = {"n_dims": pos}
    pos += 4
    for i in range(len(t.dims)):
        out[f"dim{i}"] = pos
        pos += 8
    out["type"] = pos
    out["offset"] = pos + 4
    return out


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# --------------------------------------------------------------------------
# the child process
# --------------------------------------------------------------------------

WORKER = HERE / "gguf_fuzz_child.py"


class Worker:
    """A child process that loads and uses GGUF files, one request at a
    time; restarted after it dies. ``run`` returns the child's JSON reply,
    or ``{"crash": returncode, "stderr": ...}`` when it died on the file."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_path = tmp / "worker-stderr.txt"

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.stderr = open(self.stderr_path, "w")
            env = dict(os.environ, XYBRID_LOG_LEVEL=os.environ.get("XYBRID_LOG_LEVEL", "error"))
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self.stderr, text=True, cwd=self.tmp, env=env)
        return self.proc

    def run(self, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = proc.stdout.readline()
        if line:
            reply: dict[str, Any] = json.loads(line)
            return reply
        rc = proc.wait(timeout=timeout)
        self.stderr.close()
        tail = self.stderr_path.read_text(errors="replace")[-3000:]
        self.proc = None
        return {"crash": rc, "stderr": tail}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
