"""ggml's Vulkan backend: AMD, Intel and NVIDIA GPUs on Linux and Windows (and Mesa's software lavapipe, which
runs the same shaders on the CPU and is what CI checks exactness on).

Toolchain (Debian/Ubuntu packages; elsewhere the LunarG Vulkan SDK, found through ``$VULKAN_SDK``): ``glslc``
(shaders to SPIR-V), the Vulkan headers with Vulkan-Hpp and the loader (``libvulkan-dev``) and ``spirv-headers``.
The glslc and header versions are part of the cache key. ``0008-vulkan-layer-settings-guard.patch`` (Debian 12's
1.3.239 headers predate ``VK_EXT_layer_settings``) and ``0012-vulkan-f32-exact.patch`` (f32 stays f32 on fp16
devices; a blocking fence wait on CPU-type devices) apply to Vulkan builds only.

Devices: ggml skips CPU-type Vulkan devices unless ``GGML_VK_VISIBLE_DEVICES`` names them. When the user asked
for the vulkan backend by name and the machine has no Vulkan GPU, ``prepare_load`` names the software devices
there, with a warning. Mesa keeps compiled pipelines in ``MESA_SHADER_CACHE_DIR``, set to
``$DLLM_HOME/mesa-shader-cache`` unless already set (Mesa's default is under the passwd home, not ``$HOME``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ggml_patch import vulkan_devices
from ggml_patch.backends.base import Backend, Setup, Status, error

PACKAGES_HINT = "apt install glslc libvulkan-dev spirv-headers (Debian/Ubuntu); elsewhere the Vulkan SDK"


def _sdk() -> list[Path]:
    sdk = os.environ.get("VULKAN_SDK")
    return [Path(sdk)] if sdk else []


def _include_dirs() -> list[Path]:
    return [*(p / "include" for p in _sdk()), Path("/usr/local/include"), Path("/usr/include")]


def _lib_dirs() -> list[Path]:
    multi = sorted(Path("/usr/lib").glob("*-linux-gnu*"))
    return [*(p / "lib" for p in _sdk()), Path("/usr/local/lib"), *multi, Path("/usr/lib64"), Path("/usr/lib")]


def find_glslc() -> Path | None:
    on_path = shutil.which("glslc")
    if on_path:
        return Path(on_path)
    return next((p / "bin" / "glslc" for p in _sdk() if (p / "bin" / "glslc").is_file()), None)


def glslc_version(glslc: Path) -> str:
    """``shaderc 2023.2-1`` (the first line of ``glslc --version``), or ``unknown``."""
    try:
        out = subprocess.run([str(glslc), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.strip().splitlines() or ["unknown"])[0].strip()


def header_version(text: str) -> str | None:
    """``1.3.239`` from vulkan_core.h's ``VK_HEADER_VERSION`` and ``VK_HEADER_VERSION_COMPLETE`` lines."""
    patch = re.search(r"#define\s+VK_HEADER_VERSION\s+(\d+)", text)
    full = re.search(r"#define\s+VK_HEADER_VERSION_COMPLETE\s+VK_MAKE_API_VERSION\(\s*\d+\s*,\s*(\d+)\s*,\s*(\d+)",
                     text)
    if not patch:
        return None
    return f"{full.group(1)}.{full.group(2)}.{patch.group(1)}" if full else patch.group(1)


def find_headers() -> tuple[Path, str] | None:
    """(the vulkan_core.h with a vulkan.hpp beside it, its version)."""
    for d in _include_dirs():
        core = d / "vulkan" / "vulkan_core.h"
        if core.is_file() and (d / "vulkan" / "vulkan.hpp").is_file():
            return core, header_version(core.read_text(errors="replace")) or "unknown"
    return None


def find_spirv_headers() -> Path | None:
    """CMake's ``SPIRV-HeadersConfig.cmake`` (ggml-vulkan does ``find_package(SPIRV-Headers CONFIG REQUIRED)``)."""
    roots = [*(p for p in _sdk()), Path("/usr/local"), Path("/usr")]
    pats = ("share/cmake*", "lib/cmake", "lib/*/cmake", "lib64/cmake")
    return next((hit for r in roots for pat in pats
                 for hit in sorted(r.glob(f"{pat}/SPIRV-Headers/SPIRV-HeadersConfig.cmake"))), None)


def find_loader() -> Path | None:
    """The loader to link against (``libvulkan.so``, the unversioned link of ``libvulkan-dev``)."""
    return next((d / "libvulkan.so" for d in _lib_dirs() if (d / "libvulkan.so").exists()), None)


@dataclass(frozen=True)
class VulkanSetup(Setup):
    glslc: Path
    glslc_version: str
    headers: Path
    headers_version: str
    spirv_headers: Path
    loader: Path

    def key_parts(self) -> dict[str, str]:
        return {"glslc": self.glslc_version, "vulkan_headers": self.headers_version}

    def describe(self) -> dict[str, Any]:
        return {"glslc": str(self.glslc), "glslc_version": self.glslc_version, "headers": str(self.headers),
                "headers_version": self.headers_version, "spirv_headers": str(self.spirv_headers),
                "loader": str(self.loader)}


def vulkan_setup() -> VulkanSetup:
    """Find the Vulkan toolchain; BuildError naming every missing Debian package at once."""
    glslc, headers, spirv, loader = find_glslc(), find_headers(), find_spirv_headers(), find_loader()
    missing = [pkg for ok, pkg in ((glslc, "glslc"), (headers, "libvulkan-dev"), (spirv, "spirv-headers"),
                                   (loader, "libvulkan-dev")) if ok is None]
    if missing:
        what = {"glslc": "glslc (the shader compiler)", "libvulkan-dev": "the Vulkan headers and loader",
                "spirv-headers": "the SPIR-V headers"}
        pkgs = list(dict.fromkeys(missing))
        raise error("BuildError", f"the vulkan backend needs {', '.join(what[p] for p in pkgs)}",
                    f"apt install {' '.join(pkgs)} (Debian/Ubuntu); elsewhere the Vulkan SDK (set VULKAN_SDK)")
    assert glslc and headers and spirv and loader
    return VulkanSetup(glslc, glslc_version(glslc), headers[0], headers[1], spirv, loader)


def _probe_tag() -> str:
    """What the device list depends on: the driver selection variables, the ICD manifests and this boot."""
    parts = [os.environ.get(v, "") for v in ("VK_ICD_FILENAMES", "VK_DRIVER_FILES", "VK_ADD_DRIVER_FILES",
                                             "GGML_VK_VISIBLE_DEVICES")]
    for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"):
        try:
            parts += sorted(f"{p.name}:{p.stat().st_mtime_ns}" for p in Path(d).iterdir())
        except OSError:
            pass
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def devices() -> tuple[dict[str, Any], ...]:
    """The Vulkan devices of this machine (``vulkan_devices.probe``), remembered beside the built runtimes
    (``<runtime root>/.vulkan-devices/``: machine state, like the builds) per driver selection, ICD set and boot, so
    that ``auto`` does not start a probe process at every load."""
    from ggml_patch.build import runtime_root
    cache = runtime_root() / ".vulkan-devices" / f"{_probe_tag()}.json"
    try:
        return tuple(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    found = vulkan_devices.probe()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, cache)
    except OSError:
        pass
    return tuple(found)


def shader_cache_dir() -> Path:
    from ggml_patch.build import home
    return home() / "mesa-shader-cache"


class VulkanBackend(Backend):
    name = "vulkan"
    flags = ("-DGGML_VULKAN=ON",)
    patches = ("0008-vulkan-layer-settings-guard.patch", "0012-vulkan-f32-exact.patch")
    auto_help = "vulkan with a Vulkan GPU (not a software device) and glslc"

    def present(self) -> bool:
        return find_glslc() is not None and any(not d["software"] for d in devices())

    def setup(self, status: Status, options: dict[str, Any]) -> Setup:
        status("checking the Vulkan toolchain (glslc, headers, SPIR-V headers, loader)")
        return vulkan_setup()

    def info(self, build: dict[str, Any]) -> dict[str, Any] | None:
        if build.get("backend") != "vulkan":
            return None
        raw = build.get("vulkan")
        rec: dict = raw if isinstance(raw, dict) else {}
        return {"glslc": rec.get("glslc_version", "unknown"), "headers": rec.get("headers_version", "unknown"),
                "visible": os.environ.get("GGML_VK_VISIBLE_DEVICES"), "devices": list(devices())}

    def info_lines(self, info: dict[str, Any] | None) -> list[str]:
        if not info:
            return []
        lines = [f"{'vulkan toolchain':17} {info['glslc']}, headers {info['headers']}"]
        for d in info["devices"]:
            kind = "software" if d["software"] else "hardware"
            lines.append(f"{'vulkan device':17} {d['index']}: {d['name']} ({d['type']}, {kind}, "
                         f"{d['driver_info'] or d['driver'] or 'driver unknown'}, {d['memory'] / 2**30:.1f} GiB)")
        if info["visible"] is not None:
            lines.append(f"{'vulkan visible':17} GGML_VK_VISIBLE_DEVICES={info['visible']}")
        return lines

    def prepare_load(self, build: dict[str, Any], explicit: bool) -> list[str]:
        os.environ.setdefault("MESA_SHADER_CACHE_DIR", str(shader_cache_dir()))
        if "GGML_VK_VISIBLE_DEVICES" in os.environ or not explicit:
            return []
        devs = devices()
        if any(not d["software"] for d in devs) or not devs:
            return []
        os.environ["GGML_VK_VISIBLE_DEVICES"] = ",".join(str(d["index"]) for d in devs)
        names = ", ".join(d["name"] for d in devs)
        return [f"no Vulkan GPU here: using the software Vulkan device {names} (correct but slow; "
                f"GGML_VK_VISIBLE_DEVICES picks devices)"]


VULKAN = VulkanBackend()
