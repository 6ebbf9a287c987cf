"""CUDA builds without a GPU or a real toolkit: wheel discovery on fake site-packages layouts, the toolkit root,
the CMake flags, the architecture list in the build key, ``--cuda-arch`` validation, ``auto`` and the driver, the
missing-nvcc error, and the CUDA lines of ``dllm runtime info``. Nothing here runs nvcc."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ggml_patch import build as B
from ggml_patch.backends import cuda as cuda_backend
from ggml_patch import cuda_check
from ggml_patch import cuda_toolkit as C
from dllm_cli.errors import BuildError, RuntimeMissingError, UsageError
from io_helpers import one_line, run_cli

CUDA_H = """#pragma once
typedef int CUresult;
typedef int CUdevice;
#define cuMemGetInfo cuMemGetInfo_v2
CUresult cuInit(unsigned int Flags);
CUresult cuDeviceGet(CUdevice *device, int ordinal);
CUresult cuMemGetInfo(unsigned long *free, unsigned long *total);
"""
CC = shutil.which("cc") or shutil.which("gcc")


def _exe(path: Path, text: str = "#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_cu13(site: Path, nvcc: bool = True) -> Path:
    """The CUDA 13 wheels' shared tree: site/nvidia/cu13/{bin,include,lib,nvvm} and their dist-info dirs."""
    root = site / "nvidia" / "cu13"
    if nvcc:
        _exe(root / "bin" / "nvcc")
    _exe(root / "bin" / "ptxas")
    _touch(root / "bin" / "nvcc.profile", "TOP = $(_HERE_)/..\n")
    for h in ("cuda_runtime.h", "cublas_v2.h"):
        _touch(root / "include" / h)
    _touch(root / "include" / "cuda.h", CUDA_H)
    _touch(root / "include" / "cccl" / "cub" / "cub.cuh")
    for lib in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libnvrtc-builtins.so.13.5"):
        _touch(root / "lib" / lib)
    _exe(root / "nvvm" / "bin" / "cicc")
    for dist in ("nvidia_cuda_nvcc-13.0.88", "nvidia_cuda_runtime-13.0.96", "nvidia_cublas-13.1.0.3",
                 "nvidia_cuda_cccl-13.0.85", "nvidia_nvvm-13.0.88"):
        (site / f"{dist}.dist-info").mkdir(parents=True, exist_ok=True)
    return root


def fake_cu12(site: Path, nvcc: bool = False) -> Path:
    """The CUDA 12 wheels: one tree per package (nvidia-cuda-nvcc-cu12 really has no nvcc)."""
    nv = site / "nvidia"
    _exe(nv / "cuda_nvcc" / "bin" / "ptxas")
    if nvcc:
        _exe(nv / "cuda_nvcc" / "bin" / "nvcc", "#!/bin/sh\necho 'release 12.9, V12.9.86'\n")
        _exe(nv / "cuda_nvcc" / "nvvm" / "bin" / "cicc")
    _touch(nv / "cuda_runtime" / "include" / "cuda_runtime.h")
    _touch(nv / "cuda_runtime" / "include" / "cuda.h", CUDA_H)
    _touch(nv / "cublas" / "include" / "cublas_v2.h")
    _touch(nv / "cuda_runtime" / "lib" / "libcudart.so.12")
    _touch(nv / "cublas" / "lib" / "libcublas.so.12")
    _touch(nv / "cublas" / "lib" / "libcublasLt.so.12")
    for dist in ("nvidia_cuda_nvcc_cu12-12.9.86", "nvidia_cuda_runtime_cu12-12.9.79", "nvidia_cublas_cu12-12.9.1.4"):
        (site / f"{dist}.dist-info").mkdir(parents=True, exist_ok=True)
    return nv


@pytest.fixture
def no_system_cuda(monkeypatch):
    """No nvcc on PATH, in $CUDA_HOME or /usr/local/cuda; the wheel search sees only $DLLM_CUDA_WHEELS."""
    monkeypatch.setattr(C, "_system_nvcc_candidates", lambda: [])
    monkeypatch.setattr(C, "search_dirs", lambda: [Path(p) for p in os.environ.get("DLLM_CUDA_WHEELS", "").split(":")
                                                  if p])
    monkeypatch.delenv("DLLM_CUDA_WHEELS", raising=False)
    monkeypatch.setattr(C, "visible_gpu_archs", lambda: [])


# --- discovery ---------------------------------------------------------------------------------------------------
def test_cu13_wheels_are_found_with_version_and_packages(tmp_path, no_system_cuda, monkeypatch):
    root = fake_cu13(tmp_path / "site")
    monkeypatch.setenv("DLLM_CUDA_WHEELS", str(tmp_path / "site"))
    tk = C.find("auto")
    assert tk is not None and tk.origin == "pip" and tk.nvcc == root / "bin" / "nvcc"
    assert tk.version == "13.0.88" and tk.major == 13
    assert tk.lib_dirs == (root / "lib",) and tk.include_dirs == (root / "include",) and tk.nvvm == root / "nvvm"
    assert dict(tk.packages)["nvidia-cublas"] == "13.1.0.3"
    assert C.find("system") is None
    d = tk.describe()
    assert d["origin"] == "pip" and d["version"] == "13.0.88" and d["lib_dirs"] == [str(root / "lib")]


def test_system_toolkit_comes_first_in_auto(tmp_path, no_system_cuda, monkeypatch):
    fake_cu13(tmp_path / "site")
    monkeypatch.setenv("DLLM_CUDA_WHEELS", str(tmp_path / "site"))
    nvcc = tmp_path / "usr-local-cuda" / "bin" / "nvcc"
    _exe(nvcc, "#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    _touch(nvcc.parent.parent / "include" / "cuda_runtime.h")
    _touch(nvcc.parent.parent / "targets" / "x86_64-linux" / "include" / "cublas_v2.h")
    monkeypatch.setattr(C, "_system_nvcc_candidates", lambda: [nvcc])
    tk = C.find("auto")
    assert tk is not None and tk.origin == "system" and tk.home == nvcc.parent.parent
    assert C.probe_version(tk).version == "12.4.131"
    assert C.find("pip").origin == "pip"  # type: ignore[union-attr]
    flags = B.cmake_flags("cuda", cuda=B.CudaSetup(tk, tk.home, "86"))
    assert f"-DCMAKE_CUDA_COMPILER={nvcc}" in flags and f"-DCUDAToolkit_ROOT={tk.home}" in flags


def test_a_system_nvcc_without_cublas_falls_back_to_the_wheels(tmp_path, no_system_cuda, monkeypatch):
    """Like this project's machine image: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc, whose toolkit
    has the compiler and the runtime but no cuBLAS."""
    cuda = tmp_path / "cuda-13.0"
    _exe(cuda / "bin" / "nvcc")
    _touch(cuda / "include" / "cuda_runtime.h")
    wrapper = tmp_path / "local-bin" / "nvcc"
    _exe(wrapper, f'#!/bin/sh\nexec {cuda}/bin/nvcc "$@"\n')
    monkeypatch.setattr(C, "_system_nvcc_candidates", lambda: [wrapper])
    tk, why = C.find_system()
    assert tk is None and why == f"the system toolkit {cuda} (nvcc {wrapper}) has no cuBLAS"
    with pytest.raises(BuildError, match=r"no complete CUDA toolkit: .*has no cuBLAS, and no nvidia pip wheels "
                                         r"\(pip install 'dllm-cli\[cuda\]'\)"):
        C.require("auto")
    with pytest.raises(BuildError, match=r"has no cuBLAS \(install the full CUDA toolkit .*--cuda-toolkit pip\)"):
        C.require("system")
    fake_cu13(tmp_path / "site")
    monkeypatch.setenv("DLLM_CUDA_WHEELS", str(tmp_path / "site"))
    assert C.require("auto").origin == "pip"


def test_cu12_wheels_without_nvcc_are_named_and_with_one_are_used(tmp_path, no_system_cuda):
    site = tmp_path / "site"
    fake_cu12(site)
    tk, why = C.find_wheels([site])
    assert tk is None and "has no nvcc" in (why or "")
    nv = fake_cu12(tmp_path / "site2", nvcc=True)
    tk, why = C.find_wheels([tmp_path / "site2"])
    assert tk is not None and why is None and tk.version == "12.9.86" and tk.major == 12
    assert set(tk.lib_dirs) == {nv / "cuda_runtime" / "lib", nv / "cublas" / "lib"}
    assert nv / "cublas" / "include" in tk.include_dirs


def test_incomplete_wheel_set_says_what_is_missing(tmp_path, no_system_cuda):
    root = fake_cu13(tmp_path / "site")
    (root / "lib" / "libcublas.so.13").unlink()
    (root / "lib" / "libcublasLt.so.13").unlink()
    tk, why = C.find_wheels([tmp_path / "site"])
    assert tk is None and "lacks nvidia-cublas" in (why or "")


def test_no_nvcc_anywhere_is_one_line_naming_the_cuda_extra(tmp_path, no_system_cuda, monkeypatch, capsys):
    monkeypatch.setenv("DLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cuda_backend, "driver", lambda: True)
    with pytest.raises(BuildError, match=r"no CUDA compiler \(nvcc\).*pip install 'dllm-cli\[cuda\]'"):
        C.require("auto")
    code, out, err = run_cli(monkeypatch, capsys, "runtime", "build", "--backend", "cuda")
    assert code == 1 and out == ""
    one_line(err, "no CUDA compiler (nvcc)", "pip install 'dllm-cli[cuda]'")
    fake_cu12(tmp_path / "site")  # CUDA 12 wheels alone cannot compile: said so, same fix
    monkeypatch.setenv("DLLM_CUDA_WHEELS", str(tmp_path / "site"))
    code, out, err = run_cli(monkeypatch, capsys, "runtime", "build", "--backend", "cuda", "--cuda-toolkit", "pip")
    assert code == 1
    one_line(err, "has no nvcc", "pip install 'dllm-cli[cuda]'")


# --- architectures -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("86", "86"), ("80;90", "80;90"), ("80, 90-real ,75-virtual", "80;90-real;75-virtual"),
                                       ("120a-real", "120a-real"), ("NATIVE", "native"), ("89;89", "89")])
def test_cuda_arch_accepts(text, want):
    assert C.parse_archs(text) == want


@pytest.mark.parametrize("text", ["8.6", "860", "sm_86", "86-fake", "", ";", "95", "all", "86;x" * 20])
def test_cuda_arch_rejects(text):
    with pytest.raises(UsageError, match="--cuda-arch"):
        C.parse_archs(text)


@pytest.mark.parametrize("arch", ["8.6", "sm_90", ""])
def test_cli_bad_cuda_arch_exits_2_with_one_line(arch, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DLLM_HOME", str(tmp_path))
    code, out, err = run_cli(monkeypatch, capsys, "runtime", "build", "--backend", "cuda", "--cuda-arch", arch)
    assert code == 2 and out == ""
    one_line(err, "--cuda-arch")


def test_cuda_arch_with_another_backend_is_a_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DLLM_HOME", str(tmp_path))
    code, _, err = run_cli(monkeypatch, capsys, "runtime", "build", "--backend", "cpu", "--cuda-arch", "86")
    assert code == 2
    one_line(err, "--cuda-arch applies to the cuda backend")


def test_default_and_native_archs(monkeypatch):
    monkeypatch.setattr(C, "visible_gpu_archs", lambda: [])
    assert C.resolve_archs(None) == (C.DEFAULT_ARCHS, "default")
    assert C.resolve_archs("86;90") == ("86;90", "option")
    with pytest.raises(BuildError, match="no GPU is visible"):
        C.resolve_archs("native")
    monkeypatch.setattr(C, "visible_gpu_archs", lambda: ["86-real", "90-real"])
    assert C.resolve_archs(None) == ("86-real;90-real", "native")
    assert C.resolve_archs("native") == ("86-real;90-real", "native")
    assert C.resolve_archs("80") == ("80", "option")


def test_visible_gpu_archs_reads_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    _exe(smi, "#!/bin/sh\nprintf '9.0\\n8.6\\n9.0\\n'\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert C.visible_gpu_archs() == ["86-real", "90-real"]


def test_cuda13_refuses_archs_it_dropped(tmp_path, no_system_cuda, monkeypatch):
    fake_cu13(tmp_path / "site")
    monkeypatch.setenv("DLLM_CUDA_WHEELS", str(tmp_path / "site"))
    with pytest.raises(BuildError, match="cannot compile for architecture 70"):
        B.cuda_setup("70;80", "pip")


# --- the toolkit root, the CMake flags and the key ---------------------------------------------------------------
def _setup(tmp_path: Path, monkeypatch, archs: str = "80-real;90-real") -> B.CudaSetup:
    fake_cu13(tmp_path / "site")
    monkeypatch.setenv("DLLM_CUDA_WHEELS", str(tmp_path / "site"))
    monkeypatch.setenv("DLLM_HOME", str(tmp_path / "home"))
    return B.cuda_setup(archs, "pip")


@pytest.mark.skipif(CC is None, reason="no C compiler to build the libcuda stub")
def test_assembled_root_has_unversioned_libs_and_a_driver_stub(tmp_path, no_system_cuda, monkeypatch):
    setup = _setup(tmp_path, monkeypatch)
    root, wheel = setup.root, tmp_path / "site" / "nvidia" / "cu13"
    assert root.parent == tmp_path / "home" / "cuda-toolkit" and (root / ".complete").is_file()
    assert (root / "bin" / "nvcc").resolve() == (wheel / "bin" / "nvcc").resolve()
    assert (root / "bin" / "nvcc.profile").is_symlink()
    for lib in ("libcudart", "libcublas", "libcublasLt"):
        assert (root / "lib" / f"{lib}.so").resolve() == (wheel / "lib" / f"{lib}.so.13").resolve()
    assert (root / "lib" / "libnvrtc-builtins.so").is_symlink()
    assert (root / "lib64").resolve() == (root / "lib").resolve()
    assert (root / "nvvm" / "bin" / "cicc").is_file() and (root / "include" / "cccl" / "cub").is_dir()
    stub = root / "lib" / "stubs" / "libcuda.so"
    assert stub.is_file()
    dll = ctypes.CDLL(str(stub))
    assert dll.cuInit(0) == 999 and dll.cuMemGetInfo_v2(0, 0) == 999  # the versioned name, as cuda.h exports it
    if shutil.which("readelf"):
        assert "libcuda.so.1" in subprocess.run(["readelf", "-d", str(stub)], capture_output=True, text=True).stdout
        lib = tmp_path / "libx.so"
        (tmp_path / "x.c").write_text("int x(void) { return 1; }\n")
        subprocess.run([CC, "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "x.c"), "-Wl,--no-as-needed", "-lm",
                        "-Wl,--enable-new-dtags,-rpath,$ORIGIN:/opt/x"], check=True)
        needed, runpath = cuda_check.dynamic_section(lib)
        assert "libm.so.6" in needed and runpath == ["$ORIGIN", "/opt/x"]
    assert C.assemble_root(setup.toolkit, root.parent) == root  # built once


@pytest.mark.skipif(CC is None, reason="no C compiler to build the libcuda stub")
def test_cmake_flags_for_wheels(tmp_path, no_system_cuda, monkeypatch):
    setup = _setup(tmp_path, monkeypatch)
    flags = B.cmake_flags("cuda", cuda=setup)
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    assert f"-DCMAKE_CUDA_COMPILER={setup.root}/bin/nvcc" in flags
    assert f"-DCUDAToolkit_ROOT={setup.root}" in flags
    assert "-DCMAKE_CUDA_ARCHITECTURES=80-real;90-real" in flags and "-DGGML_CUDA=ON" in flags
    assert [f for f in flags if f.startswith("-DCMAKE_INSTALL_RPATH=")] == [f"-DCMAKE_INSTALL_RPATH=$ORIGIN;{lib}"]
    # what loading compares: the same fixed flags as a plain cuda build, the rest is in the key
    assert B.fixed_flags(flags) == B.fixed_flags(B.cmake_flags("cuda", amx=True))
    system = C.Toolkit("system", Path("/opt/cuda/bin/nvcc"), Path("/opt/cuda"), "12.4.131")
    sflags = B.cmake_flags("cuda", cuda=B.CudaSetup(system, system.home, "86"))
    assert "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc" in sflags and "-DCUDAToolkit_ROOT=/opt/cuda" in sflags
    assert "-DCMAKE_INSTALL_RPATH=$ORIGIN" in sflags


@pytest.mark.skipif(CC is None, reason="no C compiler to build the libcuda stub")
def test_build_key_changes_with_the_arch_list(tmp_path, no_system_cuda, monkeypatch):
    keys = {archs: B.cache_key("cuda", B.cmake_flags("cuda", cuda=_setup(tmp_path, monkeypatch, archs)))
            for archs in ("80-real;90-real", "86", "80-real;90-real;75-virtual")}
    assert len(set(keys.values())) == 3
    assert B.cache_key("cuda", B.cmake_flags("cuda", cuda=_setup(tmp_path, monkeypatch, "80-real;90-real"))) \
        == keys["80-real;90-real"]


@pytest.mark.skipif(CC is None, reason="no C compiler to build the libcuda stub")
def test_an_installed_cuda_build_is_found_and_its_info_shown(tmp_path, no_system_cuda, monkeypatch):
    from dllm_cli.runtime import library as L
    setup = _setup(tmp_path, monkeypatch)
    monkeypatch.setenv("DLLM_RUNTIME_DIR", str(tmp_path / "rt"))
    flags = B.cmake_flags("cuda", cuda=setup)
    key = B.cache_key("cuda", flags)
    d = B.install_dir("cuda", key)
    (d / "lib").mkdir(parents=True)
    (d / "build.json").write_text(json.dumps({"key": key, "backend": "cuda", "flags": flags, "cuda": setup.describe()}))
    assert L.candidates("cuda") == [("cuda", key, d)]
    info = L.cuda_info(B.read_build_info(d) or {})
    assert info is not None and info["archs"] == "80-real;90-real" and info["arch_source"] == "option"
    assert info["toolkit"]["origin"] == "pip" and info["toolkit"]["version"] == "13.0.88"
    assert L.cuda_info({"backend": "cpu"}) is None
    assert L.cuda_info({"backend": "cuda"})["toolkit"]["origin"] == "unknown"  # type: ignore[index]


def test_runtime_info_prints_the_cuda_archs_and_toolkit(monkeypatch, capsys):
    from dllm_cli.runtime import library as L
    build = {"backend": "cuda", "cuda": {"archs": "86-real", "arch_source": "native", "toolkit": {
        "origin": "pip", "version": "13.0.88", "nvcc": "/venv/site-packages/nvidia/cu13/bin/nvcc",
        "packages": {"nvidia-cuda-nvcc": "13.0.88", "nvidia-cuda-runtime": "13.0.96", "nvidia-cublas": "13.1.0.3"},
        "lib_dirs": ["/venv/site-packages/nvidia/cu13/lib"]}}}
    info = {"library": "/rt/cuda-x/lib", "backend": "cuda", "version": "dllm-patchset x", "patchset": "x",
            "llama_cpp_commit": "0c1e570", "llama_cpp_python": "0.3.36", "built_at": "now", "patches": [],
            "flags": [], "amx": False, "cpu_compiled": [], "cpu_host": [], "devices": [], "cuda": L.cuda_info(build)}

    class Fake:
        def info(self):
            return info

    monkeypatch.setattr(L, "load", lambda backend=None: Fake())
    code, out, err = run_cli(monkeypatch, capsys, "runtime", "info")
    assert code == 0, err
    lines = {line[:17].strip(): line[17:].strip() for line in out.splitlines()}
    assert lines["cuda archs"] == "86-real (native)"
    assert lines["cuda toolkit"].startswith("pip wheels 13.0.88, /venv/site-packages/nvidia/cu13/bin/nvcc")
    assert "nvidia-cublas 13.1.0.3" in lines["cuda toolkit"]
    code, out, _ = run_cli(monkeypatch, capsys, "runtime", "info", "--json")
    assert code == 0 and json.loads(out)["cuda"]["toolkit"]["origin"] == "pip"
    info["cuda"] = None
    code, out, _ = run_cli(monkeypatch, capsys, "runtime", "info")
    assert code == 0 and "cuda archs" not in out


# --- auto and the driver -----------------------------------------------------------------------------------------
def test_auto_picks_cuda_with_wheel_nvcc_only_when_a_driver_is_present(tmp_path, no_system_cuda, monkeypatch):
    from ggml_patch import backends as BK
    monkeypatch.setattr(BK.VULKAN, "present", lambda: False)
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    cpu = "metal" if B.sys.platform == "darwin" else "cpu"
    monkeypatch.setattr(cuda_backend, "driver", lambda: True)
    assert B.resolve_backend("auto") == cpu  # a driver but no nvcc anywhere
    fake_cu13(tmp_path / "site")
    monkeypatch.setenv("DLLM_CUDA_WHEELS", str(tmp_path / "site"))
    assert B.resolve_backend("auto") == "cuda"
    monkeypatch.setattr(cuda_backend, "driver", lambda: False)
    assert B.resolve_backend("auto") == cpu  # wheels without a driver: no hour-long compile of an unusable library


# --- loading a wheel build ---------------------------------------------------------------------------------------
def test_preload_needs_the_wheel_libraries(tmp_path, no_system_cuda):
    from dllm_cli.runtime import library as L
    assert L.preload_cuda_wheels({"backend": "cpu"}) == []
    assert L.preload_cuda_wheels({"backend": "cuda", "cuda": {"toolkit": {"origin": "system"}}}) == []
    gone = {"backend": "cuda", "cuda": {"toolkit": {"origin": "pip", "lib_dirs": [str(tmp_path / "gone")]}}}
    with pytest.raises(RuntimeMissingError, match=r"libcudart\.so.*pip install 'dllm-cli\[cuda\]'"):
        L.preload_cuda_wheels(gone)


@pytest.mark.skipif(CC is None, reason="no C compiler")
def test_preload_loads_the_recorded_wheel_libraries(tmp_path, no_system_cuda, monkeypatch):
    from dllm_cli.runtime import library as L
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    src = tmp_path / "x.c"
    src.write_text("int dllm_test_symbol(void) { return 7; }\n")
    for name in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"):
        subprocess.run([CC, "-shared", "-fPIC", "-o", str(lib / name), str(src)], check=True)
    monkeypatch.setattr(L, "_preloaded", [])
    got = L.preload_cuda_wheels({"backend": "cuda", "cuda": {"toolkit": {"origin": "pip", "lib_dirs": [str(lib)]}}})
    assert [p.name for p in got] == ["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"]


# --- the compile check script ------------------------------------------------------------------------------------
def test_cuda_check_times_and_sizes(tmp_path):
    b = tmp_path / "build"
    (b / "bin").mkdir(parents=True)
    (b / ".ninja_log").write_text("# ninja log v5\n0\t61500\t1\tggml/x.cu.o\tabc\n100\t2100\t1\tggml/y.cu.o\tdef\n")
    assert cuda_check.ninja_times(b) == {"ggml/x.cu.o": 61.5, "ggml/y.cu.o": 2.0}
    (b / "bin" / "libggml-cuda.so.0.9.0").write_bytes(b"x" * 10)
    (b / "bin" / "libggml-cuda.so").symlink_to("libggml-cuda.so.0.9.0")
    assert cuda_check.library_sizes(b) == {"libggml-cuda.so.0.9.0": 10}


def test_cuda_check_bad_arguments_exit_2(tmp_path, no_system_cuda, monkeypatch, capsys):
    monkeypatch.setenv("DLLM_HOME", str(tmp_path))
    if shutil.which("ninja"):
        assert cuda_check.main(["--only", "("]) == 2
        assert "not a regular expression" in capsys.readouterr().err
        assert cuda_check.main(["--arch", "8.6"]) == 2
        assert "--cuda-arch" in capsys.readouterr().err
    assert cuda_check.main(["--jobs", "0"]) == 2
