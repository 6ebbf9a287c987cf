"""Inputs that used to get past the checks to a crash or a misleading error (issue 24, class 4): each is now
refused early, in one line naming the input and the fix, or handled."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType as T

from converters import convert
from converters.safetensors import save_file
from dllm_cli import domains, gguf_keys as K, outfiles
from dllm_cli.errors import ConvertError, ModelError, OutputError, UsageError
from dllm_cli.runtime.model import inspect_gguf
from gguf_edit import rewrite
from io_helpers import runtime_or_skip

DLLM = str(Path(sys.executable).with_name("dllm"))


def cli(*args, input: bytes = b"", env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DLLM, *map(str, args)], input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = r.stderr.decode(errors="replace")
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert r.returncode == code, err
    assert len(lines) == 1 and "internal error" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("checks")
    write_checkpoint(d / "ckpt", tiny_config(), seed=1)
    return convert(d / "ckpt", d / "good.gguf", outtype="f32").path


# ------------------------------------------------------------------ a stray *.safetensors beside an index


def _tensor(ckpt: Path, name: str) -> np.ndarray:
    from converters.safetensors import Checkpoint

    return Checkpoint(ckpt).get(name)


@pytest.mark.parametrize("stray", ["consolidated.safetensors", "model.safetensors", "zz-old.safetensors"])
def test_a_stray_unindexed_shard_is_ignored_with_a_warning(make_checkpoint, tmp_path, stray):
    ck = make_checkpoint(shards=3)
    ref = convert(ck, tmp_path / "ref.gguf", outtype="f32").path.read_bytes()
    name = "model.layers.0.attention.dense.weight"
    save_file({name: np.full_like(_tensor(ck, name), 7.0), "extra.weight": np.ones((2, 2), np.float32)}, ck / stray)
    warned: list[str] = []
    out = convert(ck, tmp_path / "m.gguf", outtype="f32", warn=warned.append).path
    assert out.read_bytes()[:64] == ref[:64]
    assert {t.name: t.data.tobytes() for t in GGUFReader(out).tensors} == \
        {t.name: t.data.tobytes() for t in GGUFReader(tmp_path / "ref.gguf").tensors}  # the indexed tensors
    assert len(warned) == 1 and stray in warned[0] and "not listed in model.safetensors.index.json" in warned[0]


def test_a_tensor_in_two_unindexed_shards_is_refused(make_checkpoint, tmp_path):
    ck = make_checkpoint(shards=2)
    (ck / "model.safetensors.index.json").unlink()
    name = "model.norm.weight"
    save_file({name: _tensor(ck, name)}, ck / "stray.safetensors")
    with pytest.raises(ConvertError, match="is in two shards"):
        convert(ck, tmp_path / "m.gguf", outtype="f32")


def test_an_index_naming_the_wrong_shard_is_refused(make_checkpoint, tmp_path):
    ck = make_checkpoint(shards=2)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match=f"puts tensor '{name}'"):
        convert(ck, tmp_path / "m.gguf", outtype="f32")


# ------------------------------------------------------------------ vocabulary texts


def _edit_tokenizer(ck: Path, edit) -> None:
    doc = json.loads((ck / "tokenizer.json").read_text())
    edit(doc)
    (ck / "tokenizer.json").write_text(json.dumps(doc))


def _rename_vocab(doc, new: str) -> None:
    vocab = doc["model"]["vocab"]
    old = next(t for t in vocab if t.isalpha() and len(t) > 1)
    vocab[new] = vocab.pop(old)


@pytest.mark.parametrize("case", ["nul in vocab", "nul at start", "surrogate in vocab", "nul in merge",
                                  "nul in added token"])
def test_convert_refuses_vocabulary_texts_llama_cpp_cannot_hold(make_checkpoint, tmp_path, case):
    ck = make_checkpoint()
    edits = {
        "nul in vocab": lambda d: _rename_vocab(d, "ab\u0000cd"),
        "nul at start": lambda d: _rename_vocab(d, "\u0000x"),
        "surrogate in vocab": lambda d: _rename_vocab(d, "x\ud800"),
        "nul in merge": lambda d: d["model"]["merges"].append("a\u0000 b"),
        "nul in added token": lambda d: d["added_tokens"][0].update(content="<|x\u0000|>"),
    }
    _edit_tokenizer(ck, edits[case])
    with pytest.raises(ConvertError) as e:
        convert(ck, tmp_path / "m.gguf", outtype="f32")
    assert "tokenizer.json" in str(e.value) and ("NUL" in str(e.value) or "Unicode" in str(e.value))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["nul", "nul only", "invalid utf-8", "nul in merge"])
def test_load_refuses_vocabulary_texts_with_nul_or_invalid_utf8(good, tmp_path, case):
    reader = GGUFReader(good)
    field = reader.get_field("tokenizer.ggml.tokens")
    tokens: list = [bytes(field.parts[i]) for i in field.data]
    merges_field = reader.get_field("tokenizer.ggml.merges")
    merges: list = [bytes(merges_field.parts[i]) for i in merges_field.data]
    key = "tokenizer.ggml.merges" if "merge" in case else "tokenizer.ggml.tokens"
    if case == "nul":
        tokens[300] = tokens[300] + b"\0z"
    elif case == "nul only":
        tokens[5] = b"\0"
    elif case == "invalid utf-8":
        tokens[301] = b"\xff\xfe"
    else:
        merges[0] = merges[0] + b"\0"
    bad = rewrite(good, tmp_path / "bad.gguf", set={key: (tokens if key.endswith("tokens") else merges, T.ARRAY)})
    with pytest.raises(ModelError) as e:
        inspect_gguf(bad)
    msg = str(e.value)
    assert key in msg and str(bad) in msg and ("NUL" in msg or "UTF-8" in msg), msg


def test_run_on_a_model_with_a_nul_token_is_one_line(good, tmp_path):
    reader = GGUFReader(good)
    field = reader.get_field("tokenizer.ggml.tokens")
    tokens = [bytes(field.parts[i]) for i in field.data]
    tokens[300] = b"a\0b"
    bad = rewrite(good, tmp_path / "bad.gguf", set={"tokenizer.ggml.tokens": (tokens, T.ARRAY)})
    one_line(cli("run", bad, "hi"), 1, "NUL", "tokenizer.ggml.tokens")


# ------------------------------------------------------------------ GGUF presets outside the option domains


@pytest.mark.parametrize("mode,field,value,needle", [
    ("speed", "max_post_steps", 5000, "max_post_steps"),
    ("quality", "max_post_steps", 4097, "max_post_steps"),
    ("speed", "threshold", 1.01, "threshold"),
    ("quality", "editing_threshold", -0.5, "editing_threshold"),
])
def test_presets_outside_the_domains_are_refused_at_load_naming_the_key(good, tmp_path, mode, field, value, needle):
    bad = rewrite(good, tmp_path / "bad.gguf", set={K.preset_key(mode, field): value})
    with pytest.raises(ModelError) as e:
        inspect_gguf(bad)
    msg = str(e.value)
    assert K.preset_key(mode, field) in msg and str(bad) in msg and "--" not in msg.split("(the domain")[0], msg
    r = cli("run", bad, "hi", "--mode", mode)
    line = one_line(r, 1, K.preset_key(mode, field))
    assert "re-convert" in line or "dllm convert" in line


def test_an_indel_preset_on_a_non_22_file_is_refused(good, tmp_path):
    bad = rewrite(good, tmp_path / "bad.gguf", set={K.preset_key("speed", "indel"): True})
    with pytest.raises(ModelError, match="indel"):
        inspect_gguf(bad)


def test_presets_inside_the_domains_still_load(good, tmp_path):
    ok = rewrite(good, tmp_path / "ok.gguf", set={K.preset_key("speed", "max_post_steps"): 4096,
                                                  K.preset_key("quality", "threshold"): 1.0})
    meta = inspect_gguf(ok).meta
    assert meta.presets["speed"].max_post_steps == 4096 and meta.presets["quality"].threshold == 1.0


# ------------------------------------------------------------------ config values the runtime cannot take


@pytest.mark.parametrize("overrides", [
    dict(num_attention_heads=4, head_dim=8),  # 32 != 64
    dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32, hidden_size=96),
    dict(num_attention_heads=2, num_key_value_heads=2, head_dim=16),
])
def test_heads_times_head_dim_must_equal_hidden_at_convert_time(make_checkpoint, tmp_path, overrides):
    ck = make_checkpoint(**overrides)
    with pytest.raises(ConvertError, match="num_attention_heads x head_dim"):
        convert(ck, tmp_path / "m.gguf", outtype="f32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key,value", [("rms_norm_eps", 1e-300), ("rms_norm_eps", 1e300), ("rms_norm_eps", 1e-40),
                                       ("rms_norm_eps", 10.0), ("rope_theta", 1e300), ("rope_theta", 1e39),
                                       ("routed_scaling_factor", 1e39), ("routed_scaling_factor", -1.0)])
def test_float_config_values_outside_float32_are_refused(make_checkpoint, tmp_path, key, value):
    ck = make_checkpoint()
    cfg = json.loads((ck / "config.json").read_text())
    cfg[key] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=key):
        convert(ck, tmp_path / "m.gguf", outtype="f32")
    r = cli("convert", ck, "-o", tmp_path / "m.gguf")
    one_line(r, 1, key)


@pytest.mark.parametrize("repo", ["a/..", "a/.", "org/..x", "a/b--c", "org/-x", "x" * 97 + "/y"])
def test_invalid_repo_ids_are_one_line_before_any_request(repo, tmp_path):
    r = cli("convert", repo, "-o", tmp_path / "m.gguf", env={"HF_HUB_OFFLINE": "1"})
    one_line(r, 1, "not a valid Hugging Face repo id")


# ------------------------------------------------------------------ option combinations and domains


@pytest.mark.parametrize("args", [
    ["run", "hi", "--kv-type", "q8_0", "--flash-attn", "off"],
    ["chat", "--kv-type", "q8_0", "--flash-attn", "off"],
    ["bench", "--kv-type", "q8_0", "--flash-attn", "off"],
])
def test_q8_0_kv_without_flash_attention_is_a_usage_error_before_loading(args, tmp_path):
    missing = tmp_path / "missing.gguf"  # loading would fail with "not found": the flags are checked first
    r = cli(*args[:1], missing, *args[1:]) if args[0] != "run" else cli("run", missing, *args[1:])
    one_line(r, 2, "--kv-type q8_0", "--flash-attn")


@pytest.mark.parametrize("value", ["1e-310", "5e-324", "1e-7", "-0.5"])
def test_denormal_and_tiny_temperatures_are_refused(value):
    with pytest.raises(UsageError, match="--temperature must be 0 or a number >= 1e-06"):
        domains.parse("temperature", value)
    from dllm_cli.decoding.config import make_config

    with pytest.raises(UsageError, match="--temperature"):
        make_config("quality", "2.1", temperature=float(value))


def test_temperature_zero_and_small_values_pass():
    assert domains.parse("temperature", "0") == 0.0
    assert domains.parse("temperature", "-0.0") == 0.0
    assert domains.parse("temperature", "1e-6") == 1e-6 and domains.parse("temperature", "2.5") == 2.5


def test_denormal_temperature_through_the_cli_and_chat_set():
    r = cli("run", "hi", "--temperature", "1e-310")
    one_line(r, 2, "--temperature")
    assert b"RuntimeWarning" not in r.stderr
    from dllm_cli.chat import parse_setting

    with pytest.raises(UsageError, match="--temperature"):
        parse_setting("temperature", "4e-320")


@pytest.mark.parametrize("speed", ["1e-300", "5e-324", "0.0001", "1e7", "-1"])
def test_replay_speed_outside_its_domain_is_a_usage_error(tmp_path, speed):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"kind": "start", "prompt_tokens": 1, "block_length": 32}\n')
    one_line(cli("chat", "--replay", trace, "--speed", speed), 2, "--speed")


def test_replay_speed_zero_means_no_pauses():
    from dllm_cli.cli.replay import paced

    assert list(paced([], 0.0)) == [] and domains.parse("speed", "0") == 0.0


# ------------------------------------------------------------------ the mask token inside a prompt


@pytest.mark.parametrize("prompt", ["<|mask|>", "<|mask|><|mask|><|mask|>", "What is <|mask|> + 2?",
                                    "Sort: 5 2 9<|mask|>"])
def test_a_raw_prompt_holding_the_mask_token_is_refused_before_decoding(prompt):
    runtime_or_skip()
    r = cli("run", prompt, "--raw")
    one_line(r, 2, "mask token", "--raw")
    assert b"did not converge" not in r.stderr and r.stdout == b""


def test_the_same_text_through_the_template_is_ordinary_text():
    runtime_or_skip()
    r = cli("run", "What is <|mask|> + 2?")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


# ------------------------------------------------------------------ rpc-server --host


def test_listen_address_resolves_names_to_ipv4():
    from dllm_cli.runtime import rpc

    assert rpc.listen_address("localhost") == "127.0.0.1"
    assert rpc.listen_address("127.0.0.1") == "127.0.0.1" and rpc.listen_address("0.0.0.0") == "0.0.0.0"


@pytest.mark.parametrize("host,needle", [("::1", "IPv4"), ("fe80::1", "IPv4"), ("nosuch.invalid", "cannot resolve"),
                                         ("a" * 70, "not a valid host name"), ("bad\x00host", "host")])
def test_rpc_server_hosts_it_cannot_listen_on_are_one_line_before_listening(host, needle):
    from dllm_cli.runtime import rpc

    with pytest.raises(rpc.RpcError, match=needle):
        rpc.listen_address(host)
    if "\x00" in host:
        return  # argv cannot carry a NUL
    r = cli("rpc-server", "--host", host, "--port", "50999", timeout=30)
    one_line(r, 1, needle)
    assert b"listening" not in r.stderr


def test_rpc_server_on_localhost_really_listens():
    runtime_or_skip()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([DLLM, "rpc-server", "--host", "localhost", "--port", str(port), "--threads", "1"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert p.poll() is None, p.communicate()[1]
                time.sleep(0.1)
        else:
            pytest.fail("the worker never listened")
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert b"localhost (127.0.0.1)" in err and b"Failed to create server socket" not in err


# ------------------------------------------------------------------ bench --quality-vs with another vocabulary


def test_quality_vs_another_vocabulary_fails_before_the_bench(good):
    runtime_or_skip()
    t0 = time.monotonic()
    r = cli("bench", good, "--quality-vs", "demo", "--tests", "pp", "--reps", "1", "--warmup", "0")
    one_line(r, 2, "--quality-vs", "another vocabulary")
    assert r.stdout == b"" and time.monotonic() - t0 < 60


def test_quality_check_accepts_the_same_vocabulary(good):
    from dllm_cli.bench.quality import check_comparable

    check_comparable(good, [good])
    with pytest.raises(ModelError):
        check_comparable(good, [good.with_name("missing.gguf")])


# ------------------------------------------------------------------ write failures without an errno


@pytest.mark.parametrize("exc,needle", [(OSError(), "the operating system gave no reason"),
                                        (OSError("the disk went away"), "the disk went away"),
                                        (OSError(errno.ESTALE, ""), "stale file handle")])
def test_write_errors_without_an_errno_give_a_reason_not_oserror(tmp_path, monkeypatch, exc, needle):
    real = open

    def failing(path, *a, **k):
        if str(path).endswith(".part"):
            raise exc
        return real(path, *a, **k)

    monkeypatch.setattr("builtins.open", failing)
    with pytest.raises(OutputError) as e:
        outfiles.write_text(tmp_path / "out.md", "x")
    assert "oserror" not in str(e.value).lower() and needle in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("length", [240, 250, 255])
def test_long_file_names_get_a_temporary_name_that_fits(tmp_path, length):
    out = tmp_path / ("n" * (length - 3) + ".md")
    outfiles.write_text(out, "x")
    assert out.read_text() == "x" and list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("text", ["\udcff:50052", "h\udcff:1", "a" * 70 + ":5", "a b:5", "x\x00y:5"])
def test_rpc_endpoints_that_cannot_be_host_names_are_usage_errors(text):
    from dllm_cli.runtime import rpc

    with pytest.raises(UsageError, match="not a host name or IP address"):
        rpc.parse_endpoints(text)


def test_rpc_endpoints_still_take_addresses_and_names():
    from dllm_cli.runtime import rpc

    eps = rpc.parse_endpoints("192.168.1.20:50052,[::1]:5,worker-2.local:7,bü.de:9")
    assert [str(e) for e in eps] == ["192.168.1.20:50052", "[::1]:5", "worker-2.local:7", "bü.de:9"]


def test_rpc_endpoint_with_undecodable_bytes_through_the_cli():
    r = subprocess.run([os.fsencode(DLLM), b"run", b"hi", b"--rpc", b"\xff:50052"], capture_output=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    one_line(r, 2, "--rpc")
