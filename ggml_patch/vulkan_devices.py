"""List the Vulkan physical devices through the Vulkan loader (ctypes, no Vulkan SDK or vulkaninfo needed).

Run in a subprocess (``python -m ggml_patch.vulkan_devices`` prints one JSON list) so that a driver that crashes
or hangs while enumerating cannot take dllm with it. The order is the loader's, which is the index ggml's
``GGML_VK_VISIBLE_DEVICES`` uses. Each device: index, name, type (``discrete``, ``integrated``, ``virtual``,
``cpu``, ``other``), software (a CPU-type device such as Mesa's lavapipe), driver and driver_info (Vulkan 1.2
driver properties; empty where the device predates them), api (``1.4.305``) and memory (bytes of device-local
heaps).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
from typing import Any

TYPES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
_API_1_1 = (1 << 22) | (1 << 12)
_STYPE_APP_INFO, _STYPE_INSTANCE = 0, 1
_STYPE_PROPS2, _STYPE_DRIVER_PROPS = 1000059001, 1000196000
_HEAP_DEVICE_LOCAL = 1


class _AppInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("pApplicationName", ctypes.c_char_p),
                ("applicationVersion", ctypes.c_uint32), ("pEngineName", ctypes.c_char_p),
                ("engineVersion", ctypes.c_uint32), ("apiVersion", ctypes.c_uint32)]


class _InstanceInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.POINTER(_AppInfo)), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]


def _version(v: int) -> str:
    return f"{(v >> 22) & 0x7F}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def _cstr(buf: ctypes.Array, offset: int, size: int = 256) -> str:
    raw = bytes(buf[offset:offset + size])
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _device(vk: ctypes.CDLL, index: int, pd: ctypes.c_void_p) -> dict[str, Any]:
    """Properties of one physical device (struct offsets from vulkan_core.h, x86-64 / aarch64 layout)."""
    props = (ctypes.c_ubyte * 2048)()
    driver = (ctypes.c_ubyte * 1024)()
    ctypes.c_uint32.from_buffer(driver, 0).value = _STYPE_DRIVER_PROPS
    ctypes.c_uint32.from_buffer(props, 0).value = _STYPE_PROPS2
    ctypes.c_void_p.from_buffer(props, 8).value = ctypes.addressof(driver)
    vk.vkGetPhysicalDeviceProperties2(pd, props)
    u32 = lambda buf, off: ctypes.c_uint32.from_buffer(buf, off).value  # noqa: E731
    dtype = u32(props, 16 + 16)
    mem = (ctypes.c_ubyte * 1024)()
    vk.vkGetPhysicalDeviceMemoryProperties(pd, mem)
    heaps = u32(mem, 260)
    local = sum(ctypes.c_uint64.from_buffer(mem, 264 + 16 * i).value for i in range(min(heaps, 16))
                if u32(mem, 264 + 16 * i + 8) & _HEAP_DEVICE_LOCAL)
    return {"index": index, "name": _cstr(props, 16 + 20), "type": TYPES.get(dtype, "other"),
            "software": dtype == 4, "driver": _cstr(driver, 20), "driver_info": _cstr(driver, 276),
            "api": _version(u32(props, 16)), "memory": local}


def enumerate_here() -> list[dict[str, Any]]:
    """The devices this process's Vulkan loader sees; [] without a loader or an ICD (raises nothing)."""
    name = ctypes.util.find_library("vulkan") or "libvulkan.so.1"
    try:
        vk = ctypes.CDLL(name if sys.platform != "win32" else "vulkan-1")
    except OSError:
        return []
    vk.vkCreateInstance.restype = vk.vkEnumeratePhysicalDevices.restype = ctypes.c_int32
    app = _AppInfo(_STYPE_APP_INFO, None, b"dllm", 1, b"dllm", 1, _API_1_1)
    info = _InstanceInfo(_STYPE_INSTANCE, None, 0, ctypes.pointer(app), 0, None, 0, None)
    inst = ctypes.c_void_p()
    if vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(inst)) != 0:
        return []
    try:
        n = ctypes.c_uint32(0)
        if vk.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), None) != 0 or n.value == 0:
            return []
        pds = (ctypes.c_void_p * n.value)()
        if vk.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), pds) not in (0, 5):  # VK_INCOMPLETE = 5
            return []
        return [_device(vk, i, ctypes.c_void_p(pds[i])) for i in range(n.value)]
    finally:
        vk.vkDestroyInstance(inst, None)


def probe(timeout: float = 60.0) -> list[dict[str, Any]]:
    """``enumerate_here`` in a child process (same environment: VK_ICD_FILENAMES selects drivers); [] when the
    child fails or times out."""
    try:
        res = subprocess.run([sys.executable, "-m", "ggml_patch.vulkan_devices"], capture_output=True, text=True,
                             timeout=timeout)
        out = json.loads(res.stdout) if res.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    return [d for d in out if isinstance(d, dict)] if isinstance(out, list) else []


if __name__ == "__main__":
    print(json.dumps(enumerate_here()))
