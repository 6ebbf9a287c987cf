"""Fetch the pinned llama-cpp-python sdist, apply ``patches/*.patch`` to its vendored llama.cpp, build
the shared libraries with CMake and install them into ``$DLLM_HOME/runtime/<key>/``.

Run as ``python -m ggml_patch.build fetch|sdist-path`` (used by the Makefile before dllm is installed);
``dllm runtime build`` drives the rest.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e570"  # the llama.cpp commit vendored in that sdist
PATCH_DIR = Path(__file__).resolve().parent / "patches"


class FetchError(RuntimeError):
    """The sdist could not be downloaded or failed its checksum."""


def home() -> Path:
    return Path(os.environ.get("DLLM_HOME") or Path.home() / ".cache" / "dllm")


def sdist_path() -> Path:
    return home() / "sdist" / SDIST_NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(log=print) -> Path:
    """Download the pinned sdist through pip (once) and verify its sha256."""
    dest = sdist_path()
    if dest.is_file() and sha256(dest) == SDIST_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {PACKAGE}=={VERSION} sdist through pip ...")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if not got.is_file():
            raise FetchError(f"pip could not download {PACKAGE}=={VERSION}: {res.stderr.strip()[-300:]}")
        digest = sha256(got)
        if digest != SDIST_SHA256:
            raise FetchError(f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}")
        os.replace(got, dest)
    return dest


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "fetch"
    try:
        if cmd == "fetch":
            print(fetch(log=lambda m: print(m, file=sys.stderr)))
        elif cmd == "sdist-path":
            print(sdist_path())
        else:
            print(f"usage: python -m ggml_patch.build fetch|sdist-path", file=sys.stderr)
            return 2
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
