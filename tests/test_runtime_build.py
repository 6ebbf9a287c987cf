"""The patched runtime: cache key, patch application, marker check, and the C additions on a tiny llada2 GGUF.

Nothing here rebuilds llama.cpp: the library tests use the build installed by ``dllm runtime build`` and are
skipped (with the reason) when there is none.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ggml_patch import build as B
from ggml_patch import backends as BK
from ggml_patch.backends import cuda as cuda_backend
from dllm_cli.errors import BuildError, RuntimeMissingError

REPO = Path(__file__).resolve().parents[1]
_REAL_SDIST = Path(os.environ.get("DLLM_HOME") or Path.home() / ".cache" / "dllm") / "sdist" / B.SDIST_NAME


def _current_build() -> tuple[str, str, Path] | None:
    from dllm_cli.runtime.library import candidates
    found = candidates("cpu") or candidates("auto")
    return found[0] if found else None


@pytest.fixture
def rt():
    from dllm_cli.runtime.library import load
    if _current_build() is None:
        pytest.skip("no runtime built from the current patches is installed (run `dllm runtime build`)")
    return load()


# --- build bookkeeping (no compiler needed) --------------------------------------------------------------------
def test_cache_key_changes_with_a_patch_backend_or_flags(tmp_path):
    pdir = tmp_path / "patches"
    pdir.mkdir()
    for p in B.patch_files():
        (pdir / p.name).write_bytes(p.read_bytes())
    patches = B.patch_files(pdir)
    key = B.cache_key("cpu", patches=patches)
    assert key == B.cache_key("cpu") and len(key) == B.KEY_LEN
    shared = [p for p in patches if p.name not in BK.backend_only_patches()]
    shared[-1].write_bytes(shared[-1].read_bytes() + b"\n")
    assert B.cache_key("cpu", patches=patches) != key
    shared[-1].unlink()
    assert B.cache_key("cpu", patches=B.patch_files(pdir)) != key
    assert B.cache_key("cuda") != B.cache_key("cpu")
    assert B.cache_key("cpu", flags=B.cmake_flags("cpu") + ["-DGGML_NATIVE=OFF"]) != B.cache_key("cpu")


def test_auto_backend_needs_a_driver_for_cuda(monkeypatch):
    monkeypatch.setattr(BK.VULKAN, "present", lambda: False)
    monkeypatch.setattr(B.shutil, "which", lambda name: "/usr/bin/nvcc" if name == "nvcc" else None)
    monkeypatch.setattr(cuda_backend, "driver", lambda: False)
    assert B.resolve_backend("auto") == ("metal" if sys.platform == "darwin" else "cpu")
    monkeypatch.setattr(cuda_backend, "driver", lambda: True)
    assert B.resolve_backend("auto") == "cuda"
    with pytest.raises(BuildError, match="unknown backend 'opencl'.*vulkan"):
        B.resolve_backend("opencl")


def _extract_touched(sdist: Path, patch: Path, dest: Path) -> None:
    """Extract only the files a patch modifies from the sdist's vendor/llama.cpp."""
    prefix = f"llama_cpp_python-{B.VERSION}/vendor/llama.cpp/"
    touched = {line[6:].strip() for line in patch.read_text().splitlines()
               if line.startswith("--- a/")}
    with tarfile.open(sdist) as tar:
        for name in touched:
            m = tar.getmember(prefix + name)
            m.name = name
            tar.extract(m, dest, filter="data")


@pytest.mark.skipif(not _REAL_SDIST.is_file(), reason=f"the pinned sdist is not downloaded ({_REAL_SDIST})")
def test_patch_applies_and_a_corrupted_one_is_named(tmp_path):
    good = B.patch_files()[0]
    src = tmp_path / "llama.cpp"
    _extract_touched(_REAL_SDIST, good, src)
    (src / "src" / "models").mkdir(parents=True, exist_ok=True)
    B.apply_patches(src, [good])
    assert 'LLM_ARCH_LLADA2,           "llada2"' in (src / "src" / "llama-arch.cpp").read_text()

    fresh = tmp_path / "fresh"
    _extract_touched(_REAL_SDIST, good, fresh)
    bad = tmp_path / "0001-broken.patch"
    bad.write_text(good.read_text().replace("    LLM_ARCH_HRM_TEXT,\n", "    LLM_ARCH_NOT_THERE,\n", 1))
    with pytest.raises(BuildError, match="0001-broken.patch does not apply") as e:
        B.apply_patches(fresh, [bad])
    assert "llama-arch.h" in str(e.value)
    assert "LLADA2" not in (fresh / "src" / "llama-arch.h").read_text()  # --check ran first: nothing applied


def test_up_to_date_build_returns_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DLLM_RUNTIME_DIR", str(tmp_path / "rt"))
    key = B.cache_key("cpu")
    d = B.install_dir("cpu", key)
    (d / "lib").mkdir(parents=True)
    (d / "build.json").write_text(json.dumps({"key": key, "backend": "cpu"}))
    res = B.build("cpu")
    assert not res.built and res.path == d and res.seconds < 1.0


def test_stale_or_missing_runtime_names_the_build_command(tmp_path, monkeypatch):
    from dllm_cli.runtime.library import check
    monkeypatch.setenv("DLLM_RUNTIME_DIR", str(tmp_path / "rt"))
    with pytest.raises(RuntimeMissingError, match="dllm runtime build"):
        check("cpu")
    old = tmp_path / "rt" / "cpu-0123456789abcdef"
    (old / "lib").mkdir(parents=True)
    (old / "build.json").write_text(json.dumps({"key": "0123456789abcdef", "backend": "cpu"}))
    with pytest.raises(RuntimeMissingError, match="other patch sets.*cpu-0123456789abcdef.*dllm runtime build"):
        check("cpu")


def test_cli_runtime_info_without_a_runtime_exits_1(tmp_path):
    env = {**os.environ, "DLLM_RUNTIME_DIR": str(tmp_path / "none"), "DLLM_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", "from dllm_cli.cli.app import main; main()", "runtime", "info"], env=env,
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1 and res.stdout == ""
    assert "dllm runtime build" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# --- the installed library ---------------------------------------------------------------------------------------
def test_installed_library_marker_matches(rt):
    from dllm_cli.runtime import bindings
    assert rt.key == B.cache_key(rt.backend, toolchain=rt.build.get("toolchain"))
    assert rt.key in bindings.version(rt)
    info = rt.info()
    assert info["llama_cpp_commit"] == B.LLAMA_CPP_COMMIT and info["patches"] == [p.name for p in B.patch_files(backend=rt.backend)]
    assert any(d["type"] == "cpu" for d in info["devices"])


def test_library_with_a_wrong_marker_is_refused(rt, tmp_path):
    """A runtime dir whose build.json claims the current key but whose library carries another marker."""
    fake_key = "feedfacefeedface"
    d = tmp_path / "rt" / f"cpu-{fake_key}"
    d.mkdir(parents=True)
    (d / "lib").symlink_to(rt.path / "lib")
    (d / "build.json").write_text(json.dumps({"key": fake_key, "backend": "cpu", "flags": B.cmake_flags("cpu")}))
    code = ("import ggml_patch.build as B; B.cache_key = lambda *a, **k: %r\n"
            "from dllm_cli.runtime.library import load\n"
            "from dllm_cli.errors import RuntimeMissingError\n"
            "try:\n    load('cpu')\nexcept RuntimeMissingError as e:\n    print('REFUSED', e)\n") % fake_key
    env = {**os.environ, "DLLM_RUNTIME_DIR": str(tmp_path / "rt")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert "REFUSED" in res.stdout and "not a build of the current patches" in res.stdout, res.stderr[-2000:]
    assert "dllm runtime build" in res.stdout


class _Ctx:
    """A bare llama_context over the ctypes API (f32 KV, no flash attention, one sequence)."""

    def __init__(self, rt, model, n_ctx: int = 256, n_batch: int = 128):
        lib = self.lib = rt.lib
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, 1
        p.n_threads = p.n_threads_batch = 2
        p.type_k = p.type_v = lib.GGML_TYPE_F32
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(model, p)
        assert self.ctx
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))

    def decode(self, tokens, start: int, rows=None) -> np.ndarray:
        b = self.batch
        rows = range(len(tokens)) if rows is None else rows
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = int(t), start + i, 1, 0
            b.logits[i] = i in rows
        b.n_tokens = len(tokens)
        assert self.lib.llama_decode(self.ctx, b) == 0
        n = len(list(rows))
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(n, self.n_vocab)).copy()

    def seq_rm(self, start: int) -> None:
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), 0, start, -1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)


@pytest.fixture
def tiny_model(rt, make_gguf):
    path = make_gguf(outtype="f32")
    lib = rt.lib
    mp = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(path).encode(), mp)
    assert model, "the patched runtime refused a llada2 GGUF"
    yield model
    lib.llama_model_free(model)


def test_llada2_gguf_loads_non_causal_with_block_length(rt, tiny_model):
    from dllm_cli import gguf_keys as K
    from dllm_cli.runtime import bindings
    buf = ctypes.create_string_buffer(64)
    assert rt.lib.llama_model_meta_val_str(tiny_model, b"general.architecture", buf, 64) > 0
    assert buf.value == b"llada2"
    rt.lib.llama_model_meta_val_str(tiny_model, K.BLOCK_LENGTH.encode(), buf, 64)
    block = int(buf.value)
    c = _Ctx(rt, tiny_model)
    try:
        assert not rt.lib.llama_get_causal_attn(c.ctx)
        assert bindings.get_attn_block(rt, c.ctx) == block > 0
        logits = c.decode(list(range(5, 5 + 8)), 0)
        assert logits.shape == (8, c.n_vocab) and np.isfinite(logits).all() and logits.std() > 0
        bindings.set_attn_block(rt, c.ctx, 0)
        assert bindings.get_attn_block(rt, c.ctx) == 0
    finally:
        c.close()


def test_block_causal_mask_one_decode_equals_blockwise_with_cache(rt, tiny_model):
    """Two blocks in one decode (all rows) == block 0, then block 1 against the cache; plain bidirectional differs."""
    from dllm_cli.runtime import bindings
    B_ = 8
    rng = np.random.default_rng(0)
    c = _Ctx(rt, tiny_model)
    try:
        toks = rng.integers(5, c.n_vocab - 1, size=2 * B_).tolist()
        bindings.set_attn_block(rt, c.ctx, B_)
        both = c.decode(toks, 0)
        c.seq_rm(0)
        first = c.decode(toks[:B_], 0)
        second = c.decode(toks[B_:], B_)
        np.testing.assert_allclose(both[:B_], first, atol=1e-4, rtol=0)
        np.testing.assert_allclose(both[B_:], second, atol=1e-4, rtol=0)
        c.seq_rm(0)
        # a block length that does not divide the batch: one decode == three blockwise decodes
        bindings.set_attn_block(rt, c.ctx, 5)
        one = c.decode(toks, 0)
        c.seq_rm(0)
        parts = np.concatenate([c.decode(toks[s:s + 5], s) for s in range(0, 2 * B_, 5)])
        np.testing.assert_allclose(one, parts, atol=1e-4, rtol=0)
        c.seq_rm(0)
        bindings.set_attn_block(rt, c.ctx, 0)  # fully bidirectional: block 0 now sees block 1
        bidir = c.decode(toks, 0)
        assert np.abs(bidir[:B_] - first).max() > 1e-3
    finally:
        c.close()


def _np_top2_excluding(logits: np.ndarray, exclude: int) -> tuple[np.ndarray, np.ndarray]:
    z = logits.astype(np.float64).copy()
    if exclude >= 0:
        z[:, exclude] = -np.inf
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :2]
    return ids, np.take_along_axis(p, ids, axis=1)


@pytest.mark.parametrize("exclude", [-1, "mask", "argmax"])
def test_confidence_head_matches_numpy(rt, tiny_model, exclude):
    from dllm_cli.runtime import bindings
    c = _Ctx(rt, tiny_model)
    try:
        toks = list(range(7, 7 + 12))
        rows = [0, 3, 4, 9, 11]
        logits = c.decode(toks, 0, rows)
        c.seq_rm(0)
        x = {-1: -1, "mask": c.n_vocab - 1, "argmax": int(logits[0].argmax())}[exclude]
        bindings.set_confidence(rt, c.ctx, True, x, keep_logits=True)
        again = c.decode(toks, 0, rows)
        np.testing.assert_allclose(again, logits, atol=1e-5)
        ids, probs = bindings.get_confidence(rt, c.ctx, len(rows))
        want_ids, want_p = _np_top2_excluding(logits, x)
        assert (ids == want_ids).all()
        np.testing.assert_allclose(probs, want_p, atol=2e-5, rtol=1e-4)
        c.seq_rm(0)
        bindings.set_confidence(rt, c.ctx, True, x, keep_logits=False)
        c.decode(toks, 0, rows)
        ids2, probs2 = bindings.get_confidence(rt, c.ctx, 2)  # fewer rows than outputs
        assert (ids2 == ids[:2]).all() and np.allclose(probs2, probs[:2], atol=1e-6)
        c.seq_rm(0)
        bindings.set_confidence(rt, c.ctx, False)
        c.decode(toks, 0, rows)
        with pytest.raises(RuntimeError, match="confidence head"):
            bindings.get_confidence(rt, c.ctx, len(rows))
    finally:
        c.close()
