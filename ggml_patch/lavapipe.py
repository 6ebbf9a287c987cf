"""Mesa's software Vulkan driver (lavapipe) from Debian bookworm-backports, unpacked privately for tests and CI.

Debian 12's own lavapipe (Mesa 22.3) corrupts its heap in longer runs of ggml's Vulkan ops (see
``docs/../shared`` probe notes in ``ggml_patch/README.md``); Mesa 25.0.7 from bookworm-backports does not. Nothing
is installed system-wide: a private apt configuration (its own sources list, lists and cache under
``$DLLM_HOME/lavapipe/apt``) downloads the ``.deb`` files, ``dpkg -x`` unpacks them under
``$DLLM_HOME/lavapipe/<version>/root`` and an ICD manifest with an absolute library path is written beside it.
A process selects it with ``VK_ICD_FILENAMES=<that manifest>`` (``env`` prints it), set before the Vulkan loader
starts. Debian/Ubuntu with apt and dpkg only.

``python -m ggml_patch.lavapipe install`` prints the manifest path; ``env`` prints ``VAR=value`` lines for a shell.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import MutableMapping

from ggml_patch.staging import staged_dir

SUITE_LINE = "deb http://deb.debian.org/debian bookworm-backports main"
VERSION = "25.0.7-2~bpo12+1"
PACKAGES = (f"mesa-vulkan-drivers={VERSION}",)
ICD_NAME = "lvp_icd.json"


def root() -> Path:
    from ggml_patch.build import home
    return home() / "lavapipe"


def manifest(base: Path | None = None) -> Path:
    """Where the ICD manifest of the pinned version lives (it exists once ``install`` ran)."""
    return (base or root()) / VERSION.replace("~", "_") / ICD_NAME


def select(env: MutableMapping[str, str], base: Path | None = None) -> None:
    """Point ``env`` at the private lavapipe (``VK_ICD_FILENAMES`` = its manifest under ``base``) when it is
    installed, ``env`` selects no driver yet and this machine has no Vulkan GPU; else leave ``env`` as it is."""
    from ggml_patch import vulkan_devices
    icd = manifest(base)
    if "VK_ICD_FILENAMES" not in env and icd.is_file() and not any(not d["software"] for d in vulkan_devices.probe()):
        env["VK_ICD_FILENAMES"] = str(icd)


def _apt(base: Path) -> list[str]:
    apt = base / "apt"
    for d in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(SUITE_LINE + "\n")
    return ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}"]


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["failed"])[-1]
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {tail}")


def install(base: Path | None = None) -> Path:
    """Download and unpack the pinned lavapipe once; returns its ICD manifest. RuntimeError with the reason when
    apt-get/dpkg are missing or the archive cannot be reached."""
    base = base or root()
    out = manifest(base)
    if out.is_file():
        return out
    for tool in ("apt-get", "dpkg"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is not available: the private lavapipe needs Debian's apt and dpkg")
    opts = _apt(base)
    _run(["apt-get", *opts, "update", "-qq"])
    dest = out.parent
    with staged_dir(dest, mode=None) as tmp:  # mkdtemp's private mode kept, as before
        debs = tmp / "debs"
        debs.mkdir()
        _run(["apt-get", *opts, "download", *PACKAGES], cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(tmp / "root")])
        libs = sorted((tmp / "root").glob("usr/lib/*/libvulkan_lvp.so"))
        if not libs:
            raise RuntimeError(f"mesa-vulkan-drivers {VERSION} has no libvulkan_lvp.so")
        shutil.rmtree(debs)
        final_lib = dest / libs[0].relative_to(tmp)
        (tmp / ICD_NAME).write_text(json.dumps({"file_format_version": "1.0.0", "ICD": {
            "library_path": str(final_lib), "api_version": "1.4.305"}}) + "\n")
    return out


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "install"
    if cmd not in ("install", "env", "path"):
        print("usage: python -m ggml_patch.lavapipe install|env|path", file=sys.stderr)
        return 2
    if cmd == "path":
        print(manifest())
        return 0
    try:
        path = install()
    except (OSError, RuntimeError) as e:
        print(f"error: lavapipe {VERSION}: {e}", file=sys.stderr)
        return 1
    print(f"VK_ICD_FILENAMES={path}" if cmd == "env" else path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
