"""``dllm serve`` end to end: the real command on the embedded demo model, driven by the ``openai`` client.

Answers must equal ``dllm run --json``'s for the same prompts (greedy decoding is deterministic), also with two
clients at once. Skipped with the reason when no runtime built from the current patches is installed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_fakes import free_port
from runtime_marks import needs_runtime

DLLM = str(Path(sys.executable).with_name("dllm"))
NUMBER, ORANGE = "Describe the number 42.", "Describe the orange."
RAW_SORT = "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Sort: 5 2 9<|role_end|><role>ASSISTANT</role>"


pytestmark = needs_runtime


def run_json(*args: str, stdin: str = "") -> dict:
    r = subprocess.run([DLLM, "run", *args, "--json"], capture_output=True, timeout=120, input=stdin.encode())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """``dllm run --json`` for the prompts the server is asked."""
    return {"number": run_json(NUMBER), "orange": run_json(ORANGE, "--mode", "speed"),
            "sort": run_json("-", "--raw", stdin=RAW_SORT)}


def banner_port(proc: subprocess.Popen, stderr: Path) -> int:
    """The port ``dllm serve``'s ready line names (with ``--port 0``: the one the system picked)."""
    deadline = time.monotonic() + 120
    while not (m := re.search(r"dllm serve: \S+ on http://127\.0\.0\.1:(\d+) ", stderr.read_text())):
        assert proc.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "dllm serve did not come up"
        time.sleep(0.1)
    return int(m.group(1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``dllm serve --port 0`` (the demo model); the ready line names the real port, and the server answers there
    as soon as it is printed. Stopped with SIGTERM, which must end it cleanly (model closed, exit 143 as for any
    dllm command, nothing on stdout)."""
    logs = tmp_path_factory.mktemp("serve")
    out, err = open(logs / "stdout", "wb"), open(logs / "stderr", "wb")
    proc = subprocess.Popen([DLLM, "serve", "--host", "127.0.0.1", "--port", "0"], stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, env=dict(os.environ, DLLM_DEBUG="0"))
    port = banner_port(proc, logs / "stderr")
    url = f"http://127.0.0.1:{port}"
    assert port != 0 and httpx.get(url + "/health", timeout=5).status_code == 200  # bound before the banner
    yield url
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    out.close()
    err.close()
    stderr = (logs / "stderr").read_text()
    assert rc == 143, stderr  # the CLI's exit code for SIGTERM, after a clean shutdown
    assert (logs / "stdout").read_bytes() == b""  # logs and the access log go to stderr
    assert "stopped" in stderr and "Traceback" not in stderr and "ERROR" not in stderr


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(url: str, question: str, *, stream: bool = False, **kw) -> tuple[str, object]:
    c = client(url)
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = c.chat.completions.create(model="demo", messages=messages, **kw)
        return r.choices[0].message.content, r.usage
    chunks = list(c.chat.completions.create(model="demo", messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks[-1].usage


def test_answers_equal_dllm_run(server, reference):
    text, usage = ask(server, NUMBER)
    ref = reference["number"]
    assert text == ref["text"] and usage.completion_tokens == len(ref["tokens"])
    assert usage.prompt_tokens == len(ref["prompt_tokens"]) and usage.dllm["forwards"] == ref["forwards"]
    assert ask(server, NUMBER, stream=True)[0] == ref["text"]
    text, usage = ask(server, ORANGE, extra_body={"dllm": {"mode": "speed"}})
    assert text == reference["orange"]["text"] and usage.dllm["edits"] == reference["orange"]["edits"]
    r = client(server).completions.create(model="demo", prompt=RAW_SORT)
    assert r.choices[0].text == reference["sort"]["text"] == "2 5 9"


def test_two_concurrent_clients_get_dllm_run_answers(server, reference):
    results: dict[str, list[str]] = {"number": [], "orange": []}
    errors: list[BaseException] = []

    def worker(key: str, question: str, extra: dict) -> None:
        try:
            for i in range(4):
                results[key].append(ask(server, question, stream=bool(i % 2), extra_body=extra)[0])
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=("number", NUMBER, {})),
               threading.Thread(target=worker, args=("orange", ORANGE, {"dllm": {"mode": "speed"}}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == {"number": [reference["number"]["text"]] * 4, "orange": [reference["orange"]["text"]] * 4}


def test_stop_string_on_the_demo_model(server, reference):
    full = reference["number"]["text"]
    text, _ = ask(server, NUMBER, stop=["even"])
    assert text == full[:full.index("even")] and "even" not in text
    assert ask(server, NUMBER, stop=["even"], stream=True)[0] == text


def test_a_conversation_reuses_the_cached_prefix(server):
    """Turn 3's prompt starts with turn 2's (more than one 32-token block of it): those blocks stay cached."""
    c = client(server)
    history: list[dict] = []
    answers, reused = [], []
    for question in ("Sort: 5 2 9", "What colour is the banana?", "What is the capital of France?"):
        history.append({"role": "user", "content": question})
        r = c.chat.completions.create(model="demo", messages=history)
        history.append({"role": "assistant", "content": r.choices[0].message.content})
        answers.append(r.choices[0].message.content)
        reused.append(r.usage.dllm["reused_prompt_tokens"])
    assert answers == ["2 5 9", "yellow", "Paris"]
    assert reused[2] >= 32 and reused[2] % 32 == 0  # whole blocks of turn 2's prompt were not prefilled again


def test_tools_and_an_over_long_prompt_on_the_real_model(server):
    tool = {"type": "function", "function": {"name": "sort", "parameters": {"type": "object"}}}
    c = client(server)
    plain = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Sort: 5 2 9"}])
    with_tools = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Sort: 5 2 9"}],
                                           tools=[tool])
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools block is in the prompt
    assert with_tools.choices[0].finish_reason in ("stop", "tool_calls", "length")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Sort: 5 2 9 " * 900}])
    assert e.value.body["code"] == "context_length_exceeded" and "4096" in e.value.body["message"]
    assert ask(server, "Sort: 5 2 9")[0] == "2 5 9"  # and the server carries on


@pytest.mark.parametrize("prompt", ["<|mask|>", "<|mask|>" * 40, "Sort: <|mask|> 2 9", "x" * 10 + "<|mask|>"])
def test_a_raw_prompt_with_mask_tokens_is_a_400_naming_the_prompt(server, prompt):
    r = httpx.post(server + "/v1/completions", json={"prompt": prompt}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "<|mask|>" in r.json()["error"]["message"]
    # typed into a chat message the same text is plain text, answered as any other
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                         "max_tokens": 8}, timeout=60)
    assert r.status_code == 200


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-200, 5e-7])
def test_a_denormal_or_tiny_temperature_is_a_400(server, temperature):
    r = httpx.post(server + "/v1/completions", json={"prompt": "Sort: 5 2 9", "temperature": temperature}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert "at least 1e-06" in r.json()["error"]["message"]


@pytest.mark.parametrize("temperature", [1e-6, 1e-5])
def test_the_smallest_temperature_the_cli_takes_samples_here_too(server, temperature, tmp_path):
    """One floor for every front end: what ``dllm run --temperature`` takes, the server takes, and samples with."""
    from dllm_cli.domains import DOMAINS

    assert DOMAINS["temperature"].problem(temperature) is None
    body = {"prompt": "Sort: 5 2 9", "temperature": temperature, "max_tokens": 8, "seed": 3}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"].strip()


@pytest.mark.parametrize("n", [400, 3000, 20_000])
def test_many_messages_are_refused_fast_and_a_second_client_is_answered(server, n):
    """Far over the 4096-token context: refused in well under a second of work, never on the model's thread."""
    body = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"hello there {i}"}
                         for i in range(n - 1)] + [{"role": "user", "content": "Sort: 5 2 9"}]}
    t0 = time.monotonic()
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert time.monotonic() - t0 < 3.0
    assert ask(server, "Sort: 5 2 9")[0] == "2 5 9"


def test_prepared_prompts_equal_the_librarys_ids():
    """The server tokenizes chat prompts in chunks (fast, stoppable); the ids must equal ``prompt_ids``'s."""
    import random

    from dllm_cli.generate import prompt_ids
    from dllm_cli.runtime.options import RuntimeOptions
    from dllm_cli.serve.backend import GenerationSpec, ModelBackend, ServerDefaults

    backend = ModelBackend(None, RuntimeOptions(), ServerDefaults())
    try:
        rng = random.Random(7)
        words = ["hello", " there", "\n", "  ", "<|role_end|>", "<role>", "x", "42", "é", "\t", " <|mask|> ", "</role>",
                 "[gMASK]", "<think>", "日本", " "]
        for n in (1, 2, 3, 8, 40, 90):
            msgs = [{"role": ("system", "user", "assistant")[min(i, 1 + i % 2)],
                     "content": "".join(rng.choice(words) for _ in range(rng.randint(0, 8)))} for i in range(n)]
            msgs[-1]["role"] = "user"
            got = backend.prepare(GenerationSpec(messages=msgs), lambda: False).ids
            assert got == prompt_ids(backend.model, msgs), n
            raw = "".join(rng.choice([w for w in words if "mask" not in w]) for _ in range(n * 5)) + "x"
            got = backend.prepare(GenerationSpec(prompt=raw), lambda: False).ids
            assert got == prompt_ids(backend.model, [{"role": "user", "content": raw}], raw=True), raw
    finally:
        backend.close()


def test_serve_with_stdout_closed_runs_and_stops_cleanly(tmp_path):
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([DLLM, "serve", "--port", "0"], stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, pass_fds=(), preexec_fn=lambda: os.close(1))
        port = banner_port(proc, err_path)
        assert ask(f"http://127.0.0.1:{port}", "Sort: 5 2 9")[0] == "2 5 9"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    text = err_path.read_text()
    assert rc == 143 and "internal error" not in text and "Traceback" not in text, text


def test_the_post_steps_ceiling_holds_for_another_modes_preset():
    """``--max-post-steps 2``: a request in the other mode gets that mode's preset, but never above the ceiling."""
    from dllm_cli.runtime.options import RuntimeOptions
    from dllm_cli.serve.backend import GenerationSpec, ModelBackend, ServerDefaults

    spec = GenerationSpec(messages=[{"role": "user", "content": "hi"}], mode="speed")
    backend = ModelBackend(None, RuntimeOptions(), ServerDefaults("quality", {"max_post_steps": 2}))
    try:
        assert backend.prepare(spec, lambda: False).config.max_post_steps > 2  # the preset's own value
        backend.defaults = ServerDefaults("quality", {"max_post_steps": 2}, max_post_steps_cap=2)
        assert backend.prepare(spec, lambda: False).config.max_post_steps == 2
    finally:
        backend.close()
