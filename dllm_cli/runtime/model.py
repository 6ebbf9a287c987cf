"""A GGUF model loaded into the patched llama.cpp: metadata, tokenizer and chat template.

``Model`` validates the file in Python first (exists, GGUF, arch ``llada2``, not truncated, and every key and
relation llama.cpp would assert on: ``hparams``), so a bad file ends in a ``ModelError`` instead of whatever
the C loader would do with it. The chat template renders in a bounded sandbox (``template``).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from dllm_cli import gguf_keys as K
from dllm_cli.errors import ModelError
from dllm_cli.registry import Preset, version_presets
from dllm_cli.runtime import aborts
from dllm_cli.runtime.deepstack import deep_stack
from dllm_cli.runtime.library import load as load_runtime
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.template import ChatTemplate
from dllm_cli import signals

_CONTROL_ATTRS = 1 << 0 | 1 << 3  # LLAMA_TOKEN_ATTR_UNKNOWN | LLAMA_TOKEN_ATTR_CONTROL (include/llama.h)

if TYPE_CHECKING:
    from dllm_cli.runtime.hparams import ModelMeta


@dataclass(frozen=True)
class GGUFInfo:
    """What Python checks before handing a file to llama.cpp."""

    arch: str
    n_tensors: int
    data_end: int
    meta: ModelMeta


def inspect_gguf(path: Path) -> GGUFInfo:
    """Validate the GGUF header and tensor table; raise ModelError naming the fix."""
    import gguf  # local: only needed here

    from dllm_cli.runtime import hparams

    if not path.is_file():
        raise ModelError(f"model file not found: {path}", "check the path, or see `dllm models`")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file", "convert a checkpoint with `dllm convert`")
    try:
        reader = gguf.GGUFReader(path, "r")
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else ""
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on damaged files
        raise ModelError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})",
                         "re-download or re-convert it") from None
    if arch != K.ARCH:
        raise ModelError(f"{path} has architecture {arch!r}, not {K.ARCH!r}",
                         "dllm runs LLaDA2.x GGUFs written by `dllm convert`")
    _check_size(path, end)
    try:
        meta = hparams.validate(reader, path)
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as e:  # gguf-py on a damaged table
        raise ModelError(f"{path} has corrupt metadata ({type(e).__name__}: {e})",
                         "re-download or re-convert it") from None
    return GGUFInfo(arch=arch, n_tensors=len(reader.tensors), data_end=end, meta=meta)


def _check_size(path: Path, end: int) -> None:
    """ModelError unless ``path`` holds the tensor data up to byte ``end`` (mapping a shorter file would end in
    SIGBUS at the first read past its end)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelError(f"cannot read {path}: {(e.strerror or type(e).__name__).lower()}", "check the path") from None
    if end > size:
        raise ModelError(f"{path} is truncated ({size} of {end} bytes)", "re-download or re-convert it")


def block_routing_capacity(model: "Model") -> int | None:
    """The block-routing pool size the loaded model runs with (0 = per-token), None if the runtime has no
    block routing at all (a build without patch 0006)."""
    fn = getattr(model.rt.cdll, "llama_dllm_block_routing", None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_int32, [ctypes.c_void_p]
    return int(fn(model.ptr))


class Model:
    """A loaded ``llama_model`` with its vocabulary. Close it (or use ``with``) to free memory."""

    def __init__(self, path: str | Path, options: RuntimeOptions | None = None) -> None:
        self.path = Path(path)
        self.options = options or RuntimeOptions()
        inspected = inspect_gguf(self.path)
        self.info = inspected.meta
        self.rt = load_runtime()
        lib = self.rt.lib
        params = lib.llama_model_default_params()
        remote = 0
        if self.options.rpc:
            from dllm_cli.runtime import rpc

            remote = rpc.connect(self.rt, rpc.parse_endpoints(self.options.rpc))
        ngl = self.options.n_gpu_layers
        params.n_gpu_layers = (999 if self.rt.backend != "cpu" or remote else 0) if ngl is None else ngl
        params.use_extra_bufts = self.options.repack
        if self.options.tensor_split:
            n = int(lib.llama_max_devices())
            if len(self.options.tensor_split) > n:
                raise ModelError(f"--tensor-split has {len(self.options.tensor_split)} shares, the runtime takes "
                                 f"at most {n}", "give one share per offload device (`dllm runtime info`)")
            self._split = (ctypes.c_float * n)(*self.options.tensor_split)
            params.tensor_split = self._split
        _check_size(self.path, inspected.data_end)  # again: the file may have shrunk since it was inspected
        aborts.mapped(self.path)
        self.ptr = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self.ptr:
            raise ModelError(f"llama.cpp could not load {self.path}", "run with DLLM_DEBUG=1 to see its log")
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.mask_id = int(lib.llama_vocab_mask(self.vocab))
        self.eos_id = int(lib.llama_vocab_eos(self.vocab))
        self.eot_id = int(lib.llama_vocab_eot(self.vocab))
        if self.mask_id < 0:
            self.close()
            raise ModelError(f"{self.path} has no {K.MASK_ID}", "re-convert it with `dllm convert`")
        self.block_length = self.info.block_length
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.ptr))
        self._check_block_routing()

    def _check_block_routing(self) -> None:
        """A LLaDA2.2 file must run with its block routing (patch 0006), never silently per token."""
        want = int(self.meta(K.EXPERT_BLOCK_CAPACITY) or 0)
        if want and block_routing_capacity(self) != want:
            self.close()
            raise ModelError(f"{self.path} is a LLaDA2.2 file (block routing, {want} experts per block) and this "
                             f"runtime build does not run its block routing", "run `dllm runtime build`")

    # --- metadata -------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        """A metadata value as text, or None when the key is absent."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.rt.lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # long values (the chat template): ask again with the right size
            buf = ctypes.create_string_buffer(n + 1)
            self.rt.lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def edit_ids(self) -> tuple[int, int] | None:
        """LLaDA2.2's (DELETE, SPLIT) token ids; None for 2.0/2.1 files."""
        return self.info.edit_ids

    @cached_property
    def routing_block(self) -> int:
        """LLaDA2.2 block routing: tokens per routing block (0 = per-token routing)."""
        return int(self.meta(K.EXPERT_BLOCK_SIZE) or 0) if self.meta(K.EXPERT_BLOCK_CAPACITY) else 0

    @cached_property
    def presets(self) -> dict[str, Preset]:
        """Decode presets per mode stored in the GGUF (validated on open), else models.toml's by model version."""
        if self.info.presets is not None:
            return dict(self.info.presets)
        return version_presets(self.version if self.version in ("2.0", "2.1", "2.2") else "2.1")

    @cached_property
    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.rt.lib.llama_model_desc(self.ptr, buf, len(buf))
        desc = buf.value.decode(errors="replace")
        # llama.cpp only knows size classes of its own archs and prints "?B" for llada2: use the real count
        n = self.n_params
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        return desc.replace("?B", size)

    @property
    def size_bytes(self) -> int:
        return int(self.rt.lib.llama_model_size(self.ptr))

    @property
    def n_params(self) -> int:
        return int(self.rt.lib.llama_model_n_params(self.ptr))

    # --- tokenizer ------------------------------------------------------------------------
    @deep_stack  # llama.cpp's pre-tokenizer regex recurses per character: long words need a big stack
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``special`` the role markers are parsed as special tokens."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ctypes.c_int32 * cap)()
        n = self.rt.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = self.rt.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        return list(buf[:n])

    def detokenize(self, ids: list[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens (role markers, EOS, masks) are dropped by default."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.n_vocab]
        if skip_special:
            ids = [i for i in ids if not self.is_special(i)]
        if not ids:
            return ""
        arr = (ctypes.c_int32 * len(ids))(*ids)
        cap = 8 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = self.rt.lib.llama_detokenize(self.vocab, arr, len(ids), buf, cap, False, not skip_special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n + 16

    def is_special(self, token: int) -> bool:
        lib = self.rt.lib
        return bool(lib.llama_vocab_is_control(self.vocab, token)) or token == self.mask_id

    def piece(self, token: int) -> str:
        """One token's text, special tokens rendered (for the live view)."""
        buf = ctypes.create_string_buffer(256)
        n = self.rt.lib.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    def piece_bytes(self, token: int) -> bytes:
        """One token's raw bytes as text (byte-level BPE undone); control tokens give ``b""``."""
        from dllm_cli.constrain import runtime_piece_bytes

        return runtime_piece_bytes(self, token)

    @cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """EOS plus end-of-turn (``<|role_end|>``) when the vocabulary has one."""
        return tuple(sorted({self.eos_id} | ({self.eot_id} if self.eot_id >= 0 else set())))

    # --- chat template --------------------------------------------------------------------
    @cached_property
    def chat_template(self) -> ChatTemplate | None:
        """The GGUF's template, compiled in a bounded sandbox (a syntax error is a ModelError naming it)."""
        src = self.info.chat_template
        return ChatTemplate(src, self.path) if src else None

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the GGUF's chat template (``--raw`` skips this)."""
        if self.chat_template is None:
            raise ModelError(f"{self.path} has no chat template", "use --raw to send the prompt as is")
        return self.chat_template.render(messages, add_generation_prompt)

    @cached_property
    def special_texts(self) -> tuple[str, ...]:
        """Texts llama.cpp turns into control tokens when special parsing is on (CONTROL or UNKNOWN attribute)."""
        get_attr, vocab = self.rt.cdll.llama_vocab_get_attr, self.vocab  # the bare C function: ~1 us a token
        get_text = self.rt.lib.llama_vocab_get_text
        texts = {get_text(vocab, i) for i in range(self.n_vocab) if get_attr(vocab, i) & _CONTROL_ATTRS}
        return tuple(sorted({t.decode("utf-8", errors="replace") for t in texts if t} - {""}))

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation: the template's markers are control tokens, message text never is."""
        if self.chat_template is None:
            raise ModelError(f"{self.path} has no chat template", "use --raw to send the prompt as is")
        return self.chat_template.token_ids(messages, lambda text, special: self.tokenize(text, special=special),
                                            self.special_texts, add_generation_prompt)

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Free the model once; a signal arriving meanwhile waits until it is freed (``signals.deferred``)."""
        with signals.deferred():
            self._release()

    def _release(self) -> None:
        # the pointer is cleared before the free: an interrupt between the two leaks at exit, never frees twice
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self.rt.lib.llama_model_free(ptr)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; explicit close() is preferred
        try:
            self._release()
        except Exception:
            pass
