"""Structured output on the real runtime: the embedded demo model, and random-weight tiny GGUFs of 2.0/2.1/2.2.

* A trivial constraint (any text) leaves the demo model's tokens exactly as unconstrained, in every mode.
* An answer already valid stays unchanged under a schema it satisfies.
* Random-weight GGUFs write garbage unconstrained; constrained, every answer validates.
* ``dllm run --json-schema/--regex``: the answer on stdout parses, ``--json`` says it was constrained, and a bad
  schema is one line with exit 2 before the model loads.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runtime_marks import needs_runtime

from dllm_cli import constrain
from dllm_cli.generate import decode_config, generate, load, prompt_ids

pytestmark = needs_runtime
PROMPTS = ["What is 23 + 45?", "Sort: 5 2 9", "Describe the number 42.", "What is the capital of Peru?", "hello"]
DLLM = [str(Path(sys.executable).with_name("dllm"))]


@pytest.fixture(scope="module")
def demo() -> Any:
    loaded = load(None)
    yield loaded
    loaded.close()


def _ids(loaded: Any, text: str) -> list[int]:
    return prompt_ids(loaded.model, [{"role": "user", "content": text}], raw=False)


@pytest.mark.parametrize("mode,kw", [("quality", {}), ("speed", {}), ("speed", {"editing": False}),
                                     ("speed", {"temperature": 0.8, "seed": 3})])
def test_trivial_constraint_changes_no_token(demo: Any, mode: str, kw: dict[str, Any]) -> None:
    c = constrain.build(demo.model, constrain.request(regex_arg=r"(?s:.*)"))
    for text in PROMPTS:
        ids = _ids(demo, text)
        cfg = decode_config(demo.model, mode, max_tokens=64, **kw)
        free = generate(demo, ids, cfg)
        held = generate(demo, ids, cfg, c)
        assert held.ids == free.ids, text
        assert held.forwards == free.forwards


def test_valid_answer_is_unchanged_by_its_schema(demo: Any) -> None:
    """The demo model answers sums with a number: valid JSON under {"type": "integer"}, so nothing changes."""
    c = constrain.build(demo.model, constrain.request(schema={"type": "integer"}))
    for text in ["What is 23 + 45?", "What is 12 + 7?", "What is 40 - 8?"]:
        ids = _ids(demo, text)
        cfg = decode_config(demo.model, "quality", max_tokens=32)
        free, held = generate(demo, ids, cfg), generate(demo, ids, cfg, c)
        assert held.ids == free.ids and isinstance(json.loads(held.text), int), (text, free.text)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["a", "é"]}, "maxItems": 2}},
          "required": ["name", "n"]}


@pytest.mark.parametrize("version", ["2.0", "2.1", "2.2"])
def test_random_weight_gguf_always_validates(make_gguf: Any, version: str, tmp_path: Path) -> None:
    from converters import convert
    from dllm_cli.runtime.options import RuntimeOptions
    from test_llada22 import write_llada22

    if version == "2.2":
        write_llada22(tmp_path / "LLaDA2.2-tiny")
        path = convert(tmp_path / "LLaDA2.2-tiny", tmp_path / "t22.gguf", outtype="f32").path
    else:
        path = make_gguf(model_version=version)
    loaded = load(str(path), RuntimeOptions(ctx_size=512))
    try:
        c = constrain.build(loaded.model, constrain.request(schema=SCHEMA))
        r = constrain.build(loaded.model, constrain.request(regex_arg=r"[0-9]{4}-[0-9]{2}-[0-9]{2}"))
        for i, (mode, kw) in enumerate([("quality", {}), ("speed", {}), ("speed", {"temperature": 1.0, "seed": 5})]):
            if version == "2.2" and kw.get("temperature"):
                kw = {**kw, "editing": False}
            ids = loaded.model.tokenize(f"prompt {i} for {version}", special=False)
            cfg = decode_config(loaded.model, mode, max_tokens=96, **kw)
            free = generate(loaded, ids, cfg)  # the control: garbage without the constraint
            assert not re.fullmatch(r"\{.*\}", free.text, re.S), free.text
            done = generate(loaded, ids, cfg, c)
            assert done.finish_reason == "eos", done.text
            jsonschema.validate(json.loads(done.text), SCHEMA)
            done = generate(loaded, ids, cfg, r)
            assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", done.text), done.text
    finally:
        loaded.close()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DLLM, "run", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_run_json_schema_and_regex(tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    p = _run("Describe France.", "--json-schema", str(schema))
    assert p.returncode == 0, p.stderr
    jsonschema.validate(json.loads(p.stdout), SCHEMA)
    p = _run("What is 23 + 45?", "--regex", "[a-z]{3}", "--json")
    doc = json.loads(p.stdout)
    assert re.fullmatch("[a-z]{3}", doc["text"]) and doc["constrained"] == "regex"


@pytest.mark.parametrize("args,needle", [
    (["--json-schema", '{"type": "object", "not": {}}'], "'not'"),
    (["--json-schema", '{"enum": []}'], "forbids every value"),
    (["--json-schema", '{"$ref": "#"}'], "recurses without bound"),
    (["--json-schema", '{"type": "number", "minimum": 1}'], "'minimum'"),
    (["--json-schema", '{"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]}'], "'oneOf'"),
    (["--json-schema", '{"allOf": [{"type": "string"}, {"type": "integer"}]}'], "'allOf'"),
    (["--json-schema", '{"type": "array", "uniqueItems": true}'], "'uniqueItems'"),
    (["--json-schema", '{"type": "integer", "minimum": 5, "maximum": 1}'], "forbids every value"),
    (["--json-schema", '{"type": "string", "minLength": 5, "maxLength": 1}'], "forbids every value"),
    (["--json-schema", "false"], "forbids every value"),
    (["--json-schema", "{oops"], "not valid JSON"),
    (["--json-schema", "/no/such.json"], "no such file"),
    (["--regex", "(unclosed"], "not a valid regular expression"),
    (["--regex", "a", "--json-schema", "{}"], "cannot be combined"),
])
def test_bad_constraints_are_usage_errors(args: list[str], needle: str) -> None:
    p = _run("x", *args, env={"DLLM_MODEL": "/no/model/is/loaded.gguf"})
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr


def test_compile_cache_is_used(demo: Any, dllm_home: Path) -> None:
    req = constrain.request(schema=SCHEMA)
    first = constrain.build(demo.model, req)
    second = constrain.build(demo.model, req)
    assert first is not None and second is not None
    assert not first.automaton.cached and second.automaton.cached
    assert (second.automaton.delta == first.automaton.delta).all()
    files = list((dllm_home / "constraints").glob("*.npz"))
    assert len(files) == 1 and not list((dllm_home / "constraints").glob("*.part"))


def test_chat_set_schema_and_off(demo: Any, capsys: Any, tmp_path: Path) -> None:
    from dllm_cli.chat import Chat
    from dllm_cli.cli.chat_cmd import Repl, Screen

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    chat = Chat(demo, decode_config(demo.model, "quality", max_tokens=64))
    repl = Repl(chat, Screen(live=False, plain=True))
    assert repl.command(f"/set schema {schema}") is None
    repl.turn(chat.ask("Describe France."))
    jsonschema.validate(json.loads(chat.conversation.turns[-1].content), SCHEMA)
    assert repl.command('/set schema {"type": "object", "not": {}}') is None  # refused: the schema stays
    assert "unsupported JSON Schema keyword 'not'" in capsys.readouterr().err
    repl.turn(chat.ask("Describe Peru."))
    jsonschema.validate(json.loads(chat.conversation.turns[-1].content), SCHEMA)
    assert repl.command("/set regex [0-9]{3}") is None
    repl.turn(chat.ask("Sort: 5 2 9"))
    assert re.fullmatch("[0-9]{3}", chat.conversation.turns[-1].content)
    assert repl.command("/set schema off") is None
    repl.turn(chat.ask("What is 23 + 45?"))
    assert chat.conversation.turns[-1].content == "68" and chat.settings()["schema"] == "off"
