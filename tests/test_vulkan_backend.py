"""The vulkan backend's plumbing, no Vulkan build needed: toolchain discovery and its one-line errors, the build key
(backend, toolchain versions, the Vulkan-only 0008 patch), what ``auto`` picks, device selection and the shader
cache at load, ``dllm runtime info`` lines, and the ctypes device probe on this machine's loader."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from ggml_patch import backends as BK
from ggml_patch import build as B
from ggml_patch import lavapipe, vulkan_devices
from ggml_patch.backends import cuda as cuda_backend
from ggml_patch.backends import vulkan as V
from dllm_cli.errors import BuildError
from io_helpers import one_line, run_cli

GUARD = "0008-vulkan-layer-settings-guard.patch"
F32_EXACT = "0012-vulkan-f32-exact.patch"
LLVMPIPE = {"index": 0, "name": "llvmpipe (LLVM 15.0.6, 256 bits)", "type": "cpu", "software": True,
            "driver": "llvmpipe", "driver_info": "Mesa 25.0.7", "api": "1.4.305", "memory": 2 << 30}
RADEON = {"index": 1, "name": "AMD Radeon RX 7600 (RADV NAVI33)", "type": "discrete", "software": False,
          "driver": "radv", "driver_info": "Mesa 25.0.7", "api": "1.4.305", "memory": 8 << 30}
_REAL_HOME = Path(os.environ.get("DLLM_HOME") or Path.home() / ".cache" / "dllm")


@pytest.fixture
def devices(monkeypatch):
    """Set what the device probe reports: ``devices(LLVMPIPE, RADEON)``."""
    def set_(*devs):
        monkeypatch.setattr(V, "devices", lambda: tuple(devs))
    return set_


# --- toolchain ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("missing, package", [("find_glslc", "glslc"), ("find_headers", "libvulkan-dev"),
                                              ("find_spirv_headers", "spirv-headers"), ("find_loader", "libvulkan-dev")])
def test_a_missing_toolchain_piece_is_one_line_naming_the_package(monkeypatch, capsys, missing, package):
    monkeypatch.setattr(V, "find_glslc", lambda: Path("/usr/bin/glslc"))
    monkeypatch.setattr(V, "find_headers", lambda: (Path("/usr/include/vulkan/vulkan_core.h"), "1.3.239"))
    monkeypatch.setattr(V, "find_spirv_headers", lambda: Path("/usr/share/cmake/SPIRV-Headers/x.cmake"))
    monkeypatch.setattr(V, "find_loader", lambda: Path("/usr/lib/libvulkan.so"))
    monkeypatch.setattr(V, missing, lambda: None)
    with pytest.raises(BuildError, match=f"apt install {package}"):
        V.vulkan_setup()
    code, out, err = run_cli(monkeypatch, capsys, "runtime", "build", "--backend", "vulkan")
    assert code == 1 and out == ""
    one_line(err, "the vulkan backend needs", f"apt install {package}", "Vulkan SDK")


def test_everything_missing_names_every_package_once(monkeypatch):
    for fn in ("find_glslc", "find_headers", "find_spirv_headers", "find_loader"):
        monkeypatch.setattr(V, fn, lambda: None)
    with pytest.raises(BuildError, match=r"apt install glslc libvulkan-dev spirv-headers \(Debian/Ubuntu\)"):
        V.vulkan_setup()


def test_header_version_is_read_from_vulkan_core_h():
    text = "#define VK_HEADER_VERSION 239\n#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, 1, 3, VK_HEADER_VERSION)\n"
    assert V.header_version(text) == "1.3.239"
    assert V.header_version("#define VK_HEADER_VERSION 290\n") == "290"
    assert V.header_version("nothing here") is None


def test_key_has_backend_and_toolchain_versions_and_the_vulkan_only_patches(tmp_path):
    tc = {"glslc": "shaderc 2023.2-1", "vulkan_headers": "1.3.239"}
    flags = B.cmake_flags("vulkan")
    key = B.cache_key("vulkan", flags, toolchain=tc)
    assert key != B.cache_key("cpu") and key != B.cache_key("vulkan", flags)
    assert key != B.cache_key("vulkan", flags, toolchain={**tc, "glslc": "shaderc 2024.1"})
    assert key != B.cache_key("vulkan", flags, toolchain={**tc, "vulkan_headers": "1.4.309"})
    names = [p.name for p in B.patch_files(backend="vulkan")]
    for only in (GUARD, F32_EXACT):
        assert only in names and only not in [p.name for p in B.patch_files(backend="cpu")]
        assert only not in [p.name for p in B.patch_files(backend="cuda")]
        # editing a Vulkan-only patch changes the Vulkan key and leaves every other backend's key alone
        pdir = tmp_path / only
        pdir.mkdir()
        for p in B.patch_files():
            (pdir / p.name).write_bytes(p.read_bytes() + (b"\n" if p.name == only else b""))
        edited = B.patch_files(pdir)
        assert B.cache_key("cpu", patches=edited) == B.cache_key("cpu")
        assert B.cache_key("cuda", patches=edited) == B.cache_key("cuda")
        assert B.cache_key("vulkan", flags, edited, toolchain=tc) != key
    assert "-DGGML_VULKAN=ON" in flags and not any("CUDA" in f for f in flags)


_REAL_SDIST = _REAL_HOME / "sdist" / B.SDIST_NAME


@pytest.mark.skipif(not _REAL_SDIST.is_file(), reason=f"the pinned sdist is not downloaded ({_REAL_SDIST})")
def test_the_guard_applies_to_the_pinned_tree(tmp_path):
    name = "ggml/src/ggml-vulkan/ggml-vulkan.cpp"
    with tarfile.open(_REAL_SDIST) as tar:
        m = tar.getmember(f"llama_cpp_python-{B.VERSION}/vendor/llama.cpp/{name}")
        m.name = name
        tar.extract(m, tmp_path, filter="data")
    B.apply_patches(tmp_path, [p for p in B.patch_files() if p.name == GUARD])
    text = (tmp_path / name).read_text()
    assert "#ifdef VK_EXT_layer_settings" in text
    assert "vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);" in text


@pytest.mark.skipif(not _REAL_SDIST.is_file(), reason=f"the pinned sdist is not downloaded ({_REAL_SDIST})")
def test_the_f32_exact_patch_applies_after_the_guard(tmp_path):
    """0012 on the pinned tree: f32 x f32 matmuls take the fp32 shaders (f32 shared memory) on fp16 devices, f32
    views are copied as f32, f32 K/V flash attention takes the fp32 shader, a CPU-type device's fence wait blocks."""
    name = "ggml/src/ggml-vulkan/ggml-vulkan.cpp"
    with tarfile.open(_REAL_SDIST) as tar:
        m = tar.getmember(f"llama_cpp_python-{B.VERSION}/vendor/llama.cpp/{name}")
        m.name = name
        tar.extract(m, tmp_path, filter="data")
    B.apply_patches(tmp_path, [p for p in B.patch_files(backend="vulkan") if p.name in (GUARD, F32_EXACT)])
    text = (tmp_path / name).read_text()
    fp16_branch = text[text.index("// FP16 subgroup path"):text.index("// FP32-only fallback path")]
    for pipeline in ("matmul_f32_f32", "matmul_id_f32_f32", "matmul_id_subgroup_f32_f32"):
        assert f'"{pipeline}", {pipeline}_fp32_len, {pipeline}_fp32_data' in fp16_branch, pipeline
        assert f"SPV_DOT2({pipeline})" not in fp16_branch, pipeline
    assert text.count("f16_type = GGML_TYPE_F32;") == 2  # mul_mat and mul_mat_id
    assert "if (device->fp16 && !f32_kv) {" in text
    assert "deviceType == vk::PhysicalDeviceType::eCpu" in text and "waitForFences({ ctx->fence }" in text


# --- auto ---------------------------------------------------------------------------------------------------------
def test_auto_picks_vulkan_only_for_a_hardware_device_with_glslc(monkeypatch, devices):
    monkeypatch.setattr(cuda_backend, "driver", lambda: False)
    monkeypatch.setattr(BK.METAL, "present", lambda: False)
    monkeypatch.setattr(V, "find_glslc", lambda: Path("/usr/bin/glslc"))
    devices(LLVMPIPE)
    assert B.resolve_backend("auto") == "cpu", "a software device (lavapipe) must not make auto pick vulkan"
    devices(LLVMPIPE, RADEON)
    assert B.resolve_backend("auto") == "vulkan"
    monkeypatch.setattr(V, "find_glslc", lambda: None)
    assert B.resolve_backend("auto") == "cpu", "no glslc: auto keeps building what it can"
    monkeypatch.setattr(V, "find_glslc", lambda: Path("/usr/bin/glslc"))
    monkeypatch.setattr(BK.CUDA, "present", lambda: True)
    assert B.resolve_backend("auto") == "cuda", "CUDA wins over Vulkan on an NVIDIA machine"
    assert B.resolve_backend("vulkan") == "vulkan"


# --- load: devices, shader cache ---------------------------------------------------------------------------------
def test_asking_for_vulkan_without_a_gpu_selects_the_software_device(monkeypatch, devices, tmp_path):
    monkeypatch.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("MESA_SHADER_CACHE_DIR", raising=False)
    devices(LLVMPIPE)
    assert V.VULKAN.prepare_load({}, explicit=False) == []
    assert "GGML_VK_VISIBLE_DEVICES" not in os.environ, "auto must not opt into a software device"
    assert os.environ["MESA_SHADER_CACHE_DIR"] == str(Path(os.environ["DLLM_HOME"]) / "mesa-shader-cache")
    warnings = V.VULKAN.prepare_load({}, explicit=True)
    assert os.environ["GGML_VK_VISIBLE_DEVICES"] == "0"
    assert len(warnings) == 1 and "llvmpipe" in warnings[0] and "slow" in warnings[0]


def test_a_gpu_or_the_users_choice_is_left_alone(monkeypatch, devices):
    monkeypatch.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("MESA_SHADER_CACHE_DIR", "/somewhere/else")
    devices(LLVMPIPE, RADEON)
    assert V.VULKAN.prepare_load({}, explicit=True) == []
    assert "GGML_VK_VISIBLE_DEVICES" not in os.environ  # ggml picks the GPU itself
    assert os.environ["MESA_SHADER_CACHE_DIR"] == "/somewhere/else"
    monkeypatch.setenv("GGML_VK_VISIBLE_DEVICES", "1")
    devices(LLVMPIPE)
    assert V.VULKAN.prepare_load({}, explicit=True) == []
    assert os.environ["GGML_VK_VISIBLE_DEVICES"] == "1"


# --- runtime info ------------------------------------------------------------------------------------------------
def test_runtime_info_lists_the_vulkan_devices(monkeypatch, capsys, devices):
    from dllm_cli.runtime import library as L
    devices(LLVMPIPE, RADEON)
    build = {"backend": "vulkan", "vulkan": {"glslc_version": "shaderc 2023.2-1", "headers_version": "1.3.239"}}
    info = {"library": "/rt/vulkan-x/lib", "backend": "vulkan", "version": "dllm-patchset x", "patchset": "x",
            "llama_cpp_commit": "0c1e570", "llama_cpp_python": "0.3.36", "built_at": "now", "patches": [],
            "flags": [], "amx": False, "cpu_compiled": [], "cpu_host": [], "devices": [], "cuda": None,
            "vulkan": V.VULKAN.info(build)}

    class Fake:
        def info(self):
            return info

    monkeypatch.setattr(L, "load", lambda backend=None: Fake())
    code, out, err = run_cli(monkeypatch, capsys, "runtime", "info")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("vulkan")]
    assert lines[0].split(None, 2)[2] == "shaderc 2023.2-1, headers 1.3.239"
    assert "0: llvmpipe (LLVM 15.0.6, 256 bits) (cpu, software, Mesa 25.0.7, 2.0 GiB)" in lines[1]
    assert "1: AMD Radeon RX 7600 (RADV NAVI33) (discrete, hardware, Mesa 25.0.7, 8.0 GiB)" in lines[2]
    code, out, _ = run_cli(monkeypatch, capsys, "runtime", "info", "--json")
    assert [d["software"] for d in json.loads(out)["vulkan"]["devices"]] == [True, False]
    assert V.VULKAN.info({"backend": "cpu"}) is None


# --- the real loader ---------------------------------------------------------------------------------------------
def test_the_device_probe_reads_this_machines_vulkan_devices(monkeypatch):
    icd = lavapipe.manifest(_REAL_HOME / "lavapipe")
    if icd.is_file():
        monkeypatch.setenv("VK_ICD_FILENAMES", str(icd))
    devs = vulkan_devices.probe()
    if not devs:
        pytest.skip("no Vulkan loader or device here (apt install libvulkan1 mesa-vulkan-drivers)")
    for d in devs:
        assert d["name"] and d["type"] in vulkan_devices.TYPES.values() and d["memory"] > 0
        assert d["api"].startswith("1.") and d["software"] == (d["type"] == "cpu")
    if icd.is_file():
        assert devs[0]["name"].startswith("llvmpipe") and devs[0]["software"]
        assert lavapipe.VERSION.split("-")[0] in devs[0]["driver_info"], devs[0]


def test_the_device_list_is_probed_once_per_driver_set_and_boot(monkeypatch, tmp_path):
    import ggml_patch.build as build_module

    monkeypatch.setattr(build_module, "runtime_root", lambda: tmp_path)  # not the machine's remembered list
    calls = []
    monkeypatch.setattr(vulkan_devices, "probe", lambda: calls.append(1) or [RADEON])
    V.devices.cache_clear()
    try:
        assert V.devices() == (RADEON,)
        V.devices.cache_clear()
        assert V.devices() == (RADEON,) and len(calls) == 1, "a second process reads the remembered list"
        monkeypatch.setenv("VK_ICD_FILENAMES", "/elsewhere/icd.json")  # another driver selection: probed again
        V.devices.cache_clear()
        assert V.devices() == (RADEON,) and len(calls) == 2
    finally:
        V.devices.cache_clear()


def test_op_check_counts_test_backend_ops_results():
    from ggml_patch import op_check
    out = ("Testing 2 devices\n\nBackend 1/2: Vulkan0\n  Device description: llvmpipe\n"
           "  MUL_MAT(type_a=q4_K,type_b=f32,m=16,n=1,k=256): OK\n"
           "  MUL_MAT(type_a=q4_K,type_b=f32,m=16,n=2,k=256): \x1b[1;31mFAIL\x1b[0m\n"
           "  MUL_MAT(type_a=bf16,type_b=f32,m=16,n=1,k=256): not supported [Vulkan0] \n"
           "  MUL_MAT(type_a=q6_K,type_b=f32,m=16,n=1,k=256): OK\n  3/4 tests passed\n")
    assert op_check.count(out) == (2, 1, 1)
    labels = {c.label for c in op_check.OPS}
    assert {"MUL_MAT", "MUL_MAT_ID", "TOP_K vocabulary rows", "SET_ROWS", "ARGSORT", "SOFT_MAX"} <= labels
