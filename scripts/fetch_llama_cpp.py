#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source into ``<repo>/llama.cpp``.

The llama.cpp source is never committed. The sdist of ``llama-cpp-python``
0.3.36 vendors llama.cpp at a known commit, and a package registry is the
only thing reachable from our machines, so we take the source from there:
download the sdist with pip, check its SHA-256, and extract only
``vendor/llama.cpp``.

The patches in ``scripts/patches/`` are applied once on top (each says what
it changes and why); ``llama.cpp/.xybrid-patches`` records which.

Idempotent: when ``llama.cpp/.xybrid-pin`` already names the pinned commit and
``.xybrid-patches`` the current patch set, the script does nothing. The meson build calls it when the folder is missing. An
sdist of xybrid carries the folder (scripts/dist_llama_cpp.py), so building
from one needs no network.

Nothing is installed anywhere: pip (a build requirement, so it is there in an
isolated build environment too) only saves the file into a temporary folder,
and prepares its metadata in a build environment of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"
VENDOR_PREFIX = "vendor/llama.cpp/"
PIN_FILE = ".xybrid-pin"
PATCH_STAMP = ".xybrid-patches"

REPO_ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = Path(__file__).resolve().parent / "patches"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_sdist(workdir: Path) -> Path:
    cache = os.environ.get("XYBRID_SDIST_CACHE")
    if cache:
        candidate = Path(cache) / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
        if candidate.is_file() and _sha256(candidate) == SDIST_SHA256:
            return candidate
    if importlib.util.find_spec("pip") is None:
        raise SystemExit(
            f"{sys.executable} has no pip to download {SDIST_NAME}=={SDIST_VERSION} "
            "(the llama.cpp source) with; install pip, or build from an xybrid sdist, "
            "which carries the source, or pass -Csetup-args=-Dllama_cpp_dir=PATH")
    # --no-binary for this package only: pip reads the sdist's metadata in an
    # isolated environment of its own and takes wheels for that step's build
    # requirements (scikit-build-core); nothing lands in the caller's environment.
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--no-binary", SDIST_NAME,
            "--dest", str(workdir), f"{SDIST_NAME}=={SDIST_VERSION}",
        ],
        check=True,
    )
    matches = list(workdir.glob("llama_cpp_python-*.tar.gz"))
    if len(matches) != 1:
        raise SystemExit(f"expected one sdist in {workdir}, found {matches}")
    return matches[0]


def _extract_vendor(sdist: Path, dest: Path) -> None:
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            # Members look like "llama_cpp_python-0.3.36/vendor/llama.cpp/...".
            _, _, inner = member.name.partition("/")
            if not inner.startswith(VENDOR_PREFIX) or not (member.isfile() or member.isdir()):
                continue
            relative = inner[len(VENDOR_PREFIX):]
            if not relative or ".." in Path(relative).parts:
                continue
            target = staging / relative
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
            os.chmod(target, member.mode & 0o777 | 0o600)
    (staging / PIN_FILE).write_text(f"{LLAMA_CPP_COMMIT}\n{SDIST_NAME}=={SDIST_VERSION}\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def is_current(dest: Path) -> bool:
    pin = dest / PIN_FILE
    return pin.is_file() and pin.read_text().split()[:1] == [LLAMA_CPP_COMMIT]


def patch_set() -> str:
    """The stamp of the committed patches: one "name sha256" line each."""
    lines = [f"{p.name} {_sha256(p)}" for p in sorted(PATCH_DIR.glob("*.patch"))]
    return "".join(line + "\n" for line in lines)


def _apply_unified_diff(root: Path, text: str, name: str) -> None:
    """Apply a git-style unified diff (modified files only) under root.

    Our own few lines instead of patch(1) or git, which a machine building
    from a checkout need not have. Every hunk must match exactly where it
    says; anything else stops the build, since a half-patched tree would
    build into something nobody tested.
    """
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        if not lines[i].startswith("--- "):
            i += 1
            continue
        target = lines[i + 1]
        if not target.startswith("+++ b/"):
            raise SystemExit(f"{name}: expected '+++ b/<path>' after line {i + 1}")
        path = root / target[len("+++ b/"):].strip()
        src = path.read_text(encoding="utf-8").splitlines(keepends=True)
        out: list[str] = []
        pos = 0  # next unread line of src
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            old_start = int(lines[i].split()[1].lstrip("-").split(",")[0])
            out.extend(src[pos:old_start - 1])
            pos = old_start - 1
            i += 1
            while i < len(lines) and lines[i][:1] in (" ", "-", "+", "\\"):
                tag, body = lines[i][:1], lines[i][1:]
                if tag in (" ", "-"):
                    if pos >= len(src) or src[pos] != body:
                        raise SystemExit(f"{name}: does not apply to {path} at line {pos + 1}")
                    if tag == " ":
                        out.append(body)
                    pos += 1
                elif tag == "+":
                    out.append(body)
                i += 1
        out.extend(src[pos:])
        path.write_text("".join(out), encoding="utf-8")


def apply_patches(dest: Path) -> None:
    stamp = dest / PATCH_STAMP
    wanted = patch_set()
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    if stamp.is_file():
        # Patched with another set: start again from the pristine source.
        fetch(dest, force=True)
        return
    for patch in sorted(PATCH_DIR.glob("*.patch")):
        _apply_unified_diff(dest, patch.read_text(encoding="utf-8"), patch.name)
    stamp.write_text(wanted)


def fetch(dest: Path, force: bool = False) -> Path:
    if is_current(dest) and not force:
        apply_patches(dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="xybrid-llama-") as tmp:
        sdist = _download_sdist(Path(tmp))
        actual = _sha256(sdist)
        if actual != SDIST_SHA256:
            raise SystemExit(
                f"{sdist.name}: SHA-256 mismatch (expected {SDIST_SHA256}, got {actual})"
            )
        _extract_vendor(sdist, dest)
    apply_patches(dest)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / "llama.cpp")
    parser.add_argument("--force", action="store_true", help="fetch even when up to date")
    parser.add_argument("--print-commit", action="store_true", help="print the pinned commit")
    args = parser.parse_args()
    if args.print_commit:
        print(LLAMA_CPP_COMMIT)
        return 0
    fetch(args.dest.resolve(), force=args.force)
    print(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
