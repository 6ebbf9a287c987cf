"""Every numeric option has one domain (``dllm_cli.domains``), checked the same way by run, chat, bench, chat's
``/set`` and ``DecodeConfig``: out-of-domain values (negative seeds, NaN, inf, zero counts) are one-line usage
errors (exit 2), never an internal error."""
from __future__ import annotations

import math
import sys

import pytest

from dllm_cli import domains
from dllm_cli.chat import SETTINGS, parse_setting
from dllm_cli.cli.app import main
from dllm_cli.decoding.config import DecodeConfig, make_config
from dllm_cli.errors import UsageError

# option -> values outside its domain (as typed on the command line)
BAD = {
    "--seed": ["-1", "18446744073709551616"],
    "--threshold": ["nan", "inf", "-0.01", "1.5", "-inf"],
    "--editing-threshold": ["nan", "2", "-1e-9"],
    "--top-p": ["0", "nan", "1.0001", "-0.5", "inf"],
    "--temperature": ["-0.1", "nan", "inf", "1e999"],
    "--top-k": ["-1", "2147483648"],
    "--max-tokens": ["0", "-5"],
    "--max-post-steps": ["-1", "4097"],
    "--block-length": ["0", "-32"],
    "--mbe": ["-1", "1025"],
    "--threads": ["0", "-2", "513"],
    "--n-gpu-layers": ["-1"],
    "--ctx-size": ["0", "31", "-4096", "1048577"],
}
CASES = [(opt, v) for opt, vals in BAD.items() for v in vals]
SET_CASES = [(o, v) for o, v in CASES if o[2:].replace("-", "_") in SETTINGS]
CONFIG_CASES = [(o, v) for o, v in CASES if o[2:].replace("-", "_") in DecodeConfig.__dataclass_fields__]
NOT_A_NUMBER = [("--seed", "1.5"), ("--seed", "abc"), ("--max-tokens", "1e3"), ("--threshold", "high"), ("--top-k", "")]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["dllm", *args])
    with pytest.raises(SystemExit) as ex:
        main()
    cap = capsys.readouterr()
    return ex.value.code, cap.out, cap.err


def assert_usage(code: int, out: str, err: str, needle: str) -> None:
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert needle in err and "internal error" not in err and "Traceback" not in err


@pytest.mark.parametrize("opt,value", CASES)
@pytest.mark.parametrize("command", ["run", "chat"])
def test_run_and_chat_refuse_out_of_domain_values_before_loading(command, opt, value, monkeypatch, capsys,
                                                                 tmp_path):
    missing = str(tmp_path / "never-loaded.gguf")  # the check comes first: no model is needed to fail
    args = [command, missing, "hi"] if command == "run" else [command, missing]
    code, out, err = run_cli(monkeypatch, capsys, *args, f"{opt}={value}")
    assert_usage(code, out, err, opt)


@pytest.mark.parametrize("value", ["-1", "5001", "1000000000", "-0"])
def test_chat_view_pace_out_of_domain_is_a_usage_error(value, monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(tmp_path / "never-loaded.gguf"), f"--view-pace={value}")
    if value == "-0":  # int("-0") is 0: pacing off, a valid value; the model is looked up next
        assert code == 1 and "never-loaded.gguf" in err
        return
    assert_usage(code, out, err, "--view-pace must be an integer in [0, 5000]")


@pytest.mark.parametrize("value", ["1.5", "abc", "", "nan", "50ms"])
def test_chat_view_pace_takes_whole_milliseconds(value, monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(tmp_path / "never-loaded.gguf"), f"--view-pace={value}")
    assert_usage(code, out, err, "--view-pace")


@pytest.mark.parametrize("opt,value", NOT_A_NUMBER)
def test_unreadable_numbers_are_usage_errors(opt, value, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "hi", f"{opt}={value}")
    assert (code, out) == (2, "") and "internal error" not in err and opt in err


@pytest.mark.parametrize("opt,value", [
    ("--prefix", "-5"), ("--prefix", "1,-5"), ("--prefix", "x"), ("--prefill", "0"), ("--prefill", "nan"),
    ("--threads", "0"), ("--threads", "2,-1"), ("--threads", ","), ("--layers", "0"), ("--layers", "a,b"),
    ("--reps", "0"), ("--warmup", "-1"), ("--ar-tokens", "0"), ("--recompute-samples", "0"),
    ("--estimate-layers", "0"), ("--max-tokens", "0"), ("--ctx-size", "8"), ("--modes", "fast"),
    ("--modes", ","), ("--tests", "pp,zz"), ("--tests", " "),
])
def test_bench_options_are_usage_errors_before_any_measurement(opt, value, monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "bench", str(tmp_path / "never-loaded.gguf"), f"{opt}={value}")
    assert_usage(code, out, err, opt)


@pytest.mark.parametrize("opt,value", SET_CASES)
def test_set_in_chat_uses_the_same_domains(opt, value):
    key = opt.lstrip("-").replace("-", "_")
    with pytest.raises(UsageError, match=opt):
        parse_setting(key, value)


@pytest.mark.parametrize("opt,value", CONFIG_CASES)
def test_decode_config_refuses_the_same_values(opt, value):
    """A library caller (and /set, through with_overrides) gets the same message as the command line."""
    key = opt.lstrip("-").replace("-", "_")
    v = int(value) if domains.DOMAINS[key].kind is int else float(value)
    with pytest.raises(UsageError, match=opt):
        make_config("speed", "2.1", **{key: v})


@pytest.mark.parametrize("name,value", [
    ("seed", 0), ("seed", 2**64 - 1), ("threshold", 0.0), ("threshold", 1.0), ("top_p", 1.0), ("top_p", 1e-9),
    ("temperature", 0.0), ("temperature", 100.0), ("max_tokens", 1), ("ctx_size", 32), ("threads", 1),
    ("mbe", 0), ("block_length", 1), ("max_post_steps", 0), ("prefix", 0), ("prefill", 1), ("speed", 0.0),
    ("view_pace", 0), ("view_pace", 5000),
])
def test_domain_edges_are_accepted(name, value):
    assert domains.check(name, value) == value


def test_every_setting_of_set_has_a_domain_or_is_a_switch():
    for key, kind in SETTINGS.items():
        assert kind is bool or key in domains.DOMAINS, key


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400"])
def test_non_finite_floats_are_refused_everywhere(text):
    for name, d in domains.DOMAINS.items():
        if d.kind is float:
            with pytest.raises(UsageError):
                d.parse(text)
            assert d.problem(float(text)) is not None and not math.isfinite(float(text))


def test_seed_minus_one_in_chat_is_refused_and_the_config_is_unchanged():
    from dllm_cli.chat import Chat

    class Loaded:
        model = None

    chat = Chat(Loaded(), make_config("speed", "2.1", seed=7))
    with pytest.raises(UsageError, match="--seed"):
        chat.set("seed", "-1")
    assert chat.config.seed == 7
