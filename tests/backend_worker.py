"""Child process of ``test_backend_exact``: run a list of jobs on one backend and write the results.

``python tests/backend_worker.py JOBS.json OUT.npz`` with ``DLLM_BACKEND`` naming the runtime to load (one runtime
per process: llama-cpp-python binds its library once). Jobs:

* ``{"kind": "logits", "model": PATH, "ngl": N|null, "flash": bool, "seqs": [{"commits": [[ids, start], ...],
  "step": [ids, start]}, ...]}``: for each sequence a fresh session commits, then steps; the step's logits
  (rows x vocab, f32) are saved as ``<job>.<seq>``.
* ``{"kind": "decode", "model": PATH, "ngl": N|null, "prompt": [ids], "mode": M, "version": V, "max_tokens": N}``:
  greedy generation with the exact runtime options; ids, forwards, edits, inserts and deletes go to ``<job>.json``.
  ``"question": TEXT`` instead of ``"prompt"`` takes the ids from the model's chat template (a real model's prompt).

Also saved: ``meta.json`` with the backend, the llama.cpp devices and per job the graph splits llama.cpp logged
for each context it reserved and its "offloaded N/M layers".
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from dllm_cli.decoding import collect, generate, make_config
from dllm_cli.generate import prompt_ids
from dllm_cli.runtime import library, options
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.session import Session


def _opts(job: dict) -> options.RuntimeOptions:
    return replace(options.EXACT, ctx_size=512, ubatch=512, threads=2, n_gpu_layers=job.get("ngl"),
                   flash_attn=bool(job.get("flash", False)))


def run(jobs: list[dict]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    rt = library.load()
    per_job = []
    for n, job in enumerate(jobs):
        with library.captured_log() as log:
            opts = _opts(job)
            with Model(Path(job["model"]), opts) as model:
                if job["kind"] == "logits":
                    for i, seq in enumerate(job["seqs"]):
                        with Session(model, opts) as s:
                            for ids, start in seq["commits"]:
                                s.commit(ids, start)
                            ids, start = seq["step"]
                            res = s.step(ids, start, range(len(ids)), want_logits=True)
                            out[f"{n}.{i}"] = np.asarray(res.logits, dtype=np.float32)
                else:
                    config = make_config(job["mode"], job["version"], max_tokens=job["max_tokens"],
                                         stop_ids=model.stop_ids)
                    with Session(model, opts) as s:
                        prompt = job.get("prompt") or prompt_ids(model, [{"role": "user", "content": job["question"]}])
                        done = collect(generate(s, prompt, config))
                    rec = {"ids": [int(t) for t in done.ids], "forwards": done.forwards, "edits": done.edits,
                           "inserts": done.inserts, "deletes": done.deletes}
                    out[f"{n}.json"] = np.frombuffer(json.dumps(rec).encode(), dtype=np.uint8)
        text = "".join(log)
        off = re.search(r"offloaded (\d+)/(\d+) layers", text)
        per_job.append({"splits": [int(m) for m in re.findall(r"splits = (\d+)", text)],
                        "offloaded": [int(off.group(1)), int(off.group(2))] if off else None})
    meta = {"backend": rt.backend, "devices": rt.info()["devices"], "jobs": per_job}
    out["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return out


def main(argv: list[str]) -> int:
    jobs = json.loads(Path(argv[0]).read_text())
    np.savez(argv[1], **run(jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
