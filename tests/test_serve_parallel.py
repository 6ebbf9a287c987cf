"""``dllm serve --parallel 4`` (issue 26), the real command driven by the real ``openai`` client.

* Concurrent clients get exactly the answer ``dllm run --json`` gives alone (text, tokens, forwards, edits,
  inserts/deletes) in every mode: LLaDA2.0 threshold, 2.1 speed and quality (the demo model), 2.2 insert/delete,
  with stop strings, seeded sampling and tools, on the exact path (``--exact``).
* A short request arriving while a long one decodes is answered before the long one ends.
* A client that disconnects frees its slot; the others go on and still get their answers alone.
* /health reports active and waiting requests and the prefix each slot holds; a conversation goes back to the
  slot holding its prefix; start-up prints the KV memory per slot.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from converters import convert
from runtime_marks import needs_runtime
from serve_fakes import free_port
from test_llada22 import write_llada22

pytestmark = needs_runtime
DLLM = str(Path(sys.executable).with_name("dllm"))


def run_json(model: str | None, prompt: str, *args: str) -> dict:
    cmd = [DLLM, "run", *([model] if model else []), "-", "--raw", "--json", "--exact", "--threads", "1", *args]
    r = subprocess.run(cmd, capture_output=True, timeout=300, input=prompt.encode())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Served:
    """``dllm serve MODEL --parallel N --exact`` on a free port; ``stop()`` sends SIGTERM and checks a clean end."""

    def __init__(self, model: str | None, tmp: Path, *args: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.err_path = tmp / "stderr"
        self.err = open(self.err_path, "wb")
        cmd = [DLLM, "serve", *([model] if model else []), "--port", str(port), "--exact", "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.err_path.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "dllm serve did not come up"
            time.sleep(0.1)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=300)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()["queue"]

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 143
        self.err.close()
        text = self.err_path.read_text()
        assert "Traceback" not in text
        return text


def complete(srv: Served, prompt: str, **kw) -> tuple[str, dict]:
    r = srv.client().completions.create(model="m", prompt=prompt, **kw)
    return r.choices[0].text, {"tokens": r.usage.completion_tokens, **r.usage.dllm}


def same(got: tuple[str, dict], ref: dict) -> bool:
    text, use = got
    return (text, use["tokens"], use["forwards"], use["edits"], use.get("inserts", 0), use.get("deletes", 0)) == (
        ref["text"], len(ref["tokens"]), ref["forwards"], ref["edits"], ref.get("inserts", 0), ref.get("deletes", 0))


def concurrently(calls: list) -> list:
    out: list = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except BaseException as e:  # checked by the caller
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny f32 GGUFs of LLaDA2.0 and LLaDA2.2 (block routing, DELETE/SPLIT)."""
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("par")
    write_checkpoint(d / "v20", tiny_config(), seed=5)
    write_llada22(d / "v22", edit_boost=3.0)
    return {"2.0": str(convert(d / "v20", d / "v20.gguf", outtype="f32", model_version="2.0").path),
            "2.2": str(convert(d / "v22", d / "v22.gguf", outtype="f32").path)}


DEMO_CASES = [  # (prompt, dllm run flags, request fields)
    ("Describe the number 42.", [], {}),
    ("Describe the orange.", ["--mode", "speed"], {"extra_body": {"dllm": {"mode": "speed"}}}),
    ("Sort: 5 2 9", ["--mode", "speed"], {"extra_body": {"dllm": {"mode": "speed"}}}),
    ("Describe France.", ["--temperature", "0.7", "--seed", "5"], {"temperature": 0.7, "seed": 5}),
    ("Describe the banana.", [], {}),
    ("What is 23 + 45?", ["--mode", "speed"], {"extra_body": {"dllm": {"mode": "speed"}}}),
    ("Describe the number 7.", ["--temperature", "1.0", "--seed", "11"], {"temperature": 1.0, "seed": 11}),
    ("Reverse: a b c d", [], {}),
]


def chat_prompt(text: str) -> str:
    return f"<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>{text}<|role_end|><role>ASSISTANT</role>"


def test_demo_model_8_clients_on_4_slots_get_their_answers_alone(tmp_path):
    refs = [run_json(None, chat_prompt(p), *flags) for p, flags, _ in DEMO_CASES]
    srv = Served(None, tmp_path, "--parallel", "4")
    try:
        got = concurrently([lambda p=p, kw=kw: complete(srv, chat_prompt(p), **kw) for p, _, kw in DEMO_CASES])
        for g, ref in zip(got, refs):
            assert not isinstance(g, BaseException), g
            assert same(g, ref), (g, ref["text"])
        # a stop string, cut exactly, also under load
        full = refs[0]["text"]
        stops = concurrently([lambda: complete(srv, chat_prompt(DEMO_CASES[0][0]), stop=["even"])[0],
                              lambda: complete(srv, chat_prompt(DEMO_CASES[4][0]))[0]])
        assert stops == [full[:full.index("even")], refs[4]["text"]]
        # tool calls: the same answer (content, tool calls, finish reason) alone and among three other requests
        tool = {"type": "function", "function": {"name": "sort", "parameters": {"type": "object"}}}

        def with_tools():
            r = srv.client().chat.completions.create(model="m", tools=[tool],
                                                     messages=[{"role": "user", "content": "Sort: 5 2 9"}])
            c = r.choices[0]
            return c.message.content, c.message.tool_calls, c.finish_reason, r.usage.completion_tokens

        alone_tools = with_tools()
        together = concurrently([with_tools] + [lambda p=p, kw=kw: complete(srv, chat_prompt(p), **kw)
                                                for p, _, kw in DEMO_CASES[4:7]])
        assert together[0] == alone_tools
        assert [t[0] for t in together[1:]] == [r["text"] for r in refs[4:7]]
        health = srv.health()
        assert health["parallel"] == 4 and health["active"] == 0 and health["waiting"] == 0
        prefixes = [s["prefix_tokens"] for s in health["slots"]]
        assert [s["slot"] for s in health["slots"]] == [0, 1, 2, 3] and not any(s["busy"] for s in health["slots"])
        assert sum(prefixes) > 0 and all(p % 32 == 0 for p in prefixes)  # committed whole blocks per slot
    finally:
        log = srv.stop()
    assert "4 slots x 4096 tokens: KV cache" in log and "MiB per slot" in log


@pytest.mark.parametrize("version, mode", [("2.0", "quality"), ("2.2", "speed"), ("2.2", "quality")])
def test_tiny_models_every_mode_concurrent_equals_alone(tiny, tmp_path, version, mode):
    prompts = ["abc", "hello there " * 3, "x" * 40, "The quick brown fox " * 4, "zz", "mid block" * 5]
    refs = [run_json(tiny[version], p, "--mode", mode, "--max-tokens", "40") for p in prompts]
    srv = Served(tiny[version], tmp_path, "--parallel", "4", "--max-tokens", "40", "--mode", mode)
    try:
        got = concurrently([lambda p=p: complete(srv, p) for p in prompts])
    finally:
        srv.stop()
    if version == "2.2":
        assert sum(r.get("inserts", 0) + r.get("deletes", 0) for r in refs) > 0  # insert/delete exercised
    for g, ref in zip(got, refs):
        assert not isinstance(g, BaseException), g
        assert same(g, ref), (g, ref)


def test_short_request_is_not_stuck_behind_a_long_one_and_disconnects_free_slots(tiny, tmp_path):
    model = tiny["2.0"]
    long_p, short_p, gone_p = "a long story " * 3, "hi", "bye " * 9
    ref_long = run_json(model, long_p, "--max-tokens", "600")
    ref_short = run_json(model, short_p, "--max-tokens", "3")
    # --max-tokens: the server's ceiling (issue 24) must allow the long request's 600
    srv = Served(model, tmp_path, "--parallel", "4", "--ctx-size", "1024", "--max-tokens", "600")
    done: dict[str, float] = {}
    try:
        def long_req():
            out = complete(srv, long_p, max_tokens=600)
            done["long"] = time.monotonic()
            return out

        def short_req():
            # arrives while the long one decodes: once a request is active (a fixed 1 s sleep was longer than the
            # whole 600-token answer of this tiny model on a quiet machine)
            t = time.monotonic()
            while srv.health()["active"] < 1:
                assert time.monotonic() - t < 30, "no request became active"
                time.sleep(0.01)
            out = complete(srv, short_p, max_tokens=3)
            done["short"] = time.monotonic()
            return out

        def gone_req():  # streams, reads one chunk, then disconnects
            stream = srv.client().completions.create(model="m", prompt=gone_p, max_tokens=600, stream=True)
            next(iter(stream))
            stream.close()
            t = time.monotonic()
            while srv.health()["active"] > 2:
                assert time.monotonic() - t < 30, "the disconnected client's slot was not freed"
                time.sleep(0.02)
            return "gone"

        got = concurrently([long_req, short_req, gone_req])
        assert got[2] == "gone"
        assert same(got[0], ref_long) and same(got[1], ref_short)
        assert done["short"] < done["long"]  # answered while the long request was still decoding
    finally:
        srv.stop()


def test_a_conversation_returns_to_the_slot_holding_its_prefix(tmp_path):
    srv = Served(None, tmp_path, "--parallel", "2")
    try:
        c = srv.client()
        # different system turns: the two conversations differ in their first block, so only the slot holding
        # a conversation's own prefix can reuse anything
        a = [{"role": "system", "content": "A."}, {"role": "user", "content": "Describe the number 42."}]
        b = [{"role": "system", "content": "B."}, {"role": "user", "content": "Describe France."}]
        ra, rb = concurrently([lambda: c.chat.completions.create(model="m", messages=a),
                               lambda: c.chat.completions.create(model="m", messages=b)])
        prefixes = sorted(s["prefix_tokens"] for s in srv.health()["slots"])
        assert prefixes[0] > 0  # both slots hold a conversation
        for conv, r in ((b, rb), (a, ra)):
            conv += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": "Sort: 5 2 9"}]
            again = c.chat.completions.create(model="m", messages=conv)
            assert again.choices[0].message.content == "2 5 9"
            assert again.usage.dllm["reused_prompt_tokens"] >= 32  # its own slot's blocks, not prefilled again
    finally:
        srv.stop()
