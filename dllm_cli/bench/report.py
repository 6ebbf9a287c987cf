"""Rendering a bench document: llama-bench-style table, Markdown, CSV; comparing two saved runs; the
extrapolation of truncated synthetic models to their full depth."""
from __future__ import annotations

import csv
import io
import math
import re
from typing import Any, Iterable

SCHEMA = "dllm-bench/1"
COLUMNS = ("model", "size", "params", "backend", "threads", "test", "t/s", "tpf", "fwd/blk", "step ms p50/p90",
           "edits/tok", "ins/del per tok", "experts/step", "ttfb s", "x recompute", "x AR", "roofline %")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "" if v is None or v == "" else format(v, spec)


def cells(r: dict[str, Any]) -> list[str]:
    """One row's table cells (empty where a column does not apply to the test)."""
    step = r.get("step_s") or {}
    ex = r.get("experts") or {}
    rc = (r.get("recompute") or {}).get("ratio", r.get("recompute_ratio"))
    ar = r.get("vs_ar")
    paper = r.get("paper_tpf")
    ar_txt = _fmt(ar)
    if paper and paper.get("vs_ar") is not None:
        ar_txt = (ar_txt + " / " if ar_txt else "") + f"{paper['vs_ar']:.2f}@tpf{paper['tpf']}"
    roof = (r.get("roofline") or {}).get("pct_of_roofline")
    return [
        re.sub(r"\s+", " ", str(r["model"])), _gib(r["size_bytes"]), _params(r["params"]), r["backend"],
        str(r["threads"]), r["test"], f"{r['tps']:.2f} ± {r['tps_sd']:.2f}", _fmt(r.get("tpf")),
        _fmt(r.get("forwards_per_block")),
        f"{1e3 * step['p50']:.1f}/{1e3 * step['p90']:.1f}" if step else "", _fmt(r.get("edits_per_token"), ".3f"),
        _indel(r), f"{ex['mean']:.1f}/{ex['of']}" if ex else "", _fmt((r.get("first_block_s") or {}).get("mean")),
        _fmt(rc), ar_txt, _fmt(roof, ".1f"),
    ]


def _indel(r: dict[str, Any]) -> str:
    """LLaDA2.2's inserts/deletes per generated token (blank for rows of models that cannot insert or delete)."""
    ins, dels = r.get("inserts_per_token"), r.get("deletes_per_token")
    return "" if ins is None or dels is None else f"{ins:.3f}/{dels:.3f}"


def table(doc: dict[str, Any], markdown: bool = False) -> str:
    rows = [list(COLUMNS)] + [cells(r) for r in doc["results"]]
    rows += [[e["model"], "", "", e["backend"], str(e["threads"]), e["test"], f"{e['tps']:.2f} (est.)", "", "",
              f"{1e3 * e['step_s']:.1f} (est.)" if e.get("step_s") else "", "", "", "", "", "", "", ""]
             for e in doc.get("estimates", [])]
    w = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    right = set(range(6, len(COLUMNS)))

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(row)) + " |"

    sep = "| " + " | ".join(("-" * (w[i] - 1) + ":") if i in right else "-" * w[i] for i in range(len(w))) + " |"
    out = [line(rows[0]), sep] + [line(r) for r in rows[1:]]
    roof = roofline_table(doc)
    if roof:
        out += ["", roof]
    if doc.get("quality"):
        out += ["", quality_table(doc["quality"])]
    if not markdown:
        m = doc.get("machine", {})
        out.append(f"\nmachine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, load {m.get('load_avg', '?')}; "
                   f"matmul {m.get('matmul_gflops', '?')} GFLOP/s, copy {m.get('bandwidth_gbs', '?')} GB/s")
        t = m.get("threads")
        if isinstance(t, dict):
            out.append(f"threads: {t.get('default_threads', '?')} by default ({t.get('physical_cores', '?')} physical "
                       f"cores, {t.get('logical_cpus', '?')} logical CPUs); thread wait {t.get('wait', '?')}")
    return "\n".join(out)


ROOF_COLUMNS = ("model", "threads", "test", "ms", "MB/layer", "GB/s", "% read BW", "GFLOP", "GFLOP/s",
                "% matmul peak", "bound", "MoE layer: experts, MB, floor ms")


def roofline_table(doc: dict[str, Any]) -> str:
    """The roofline of every step, AR and generation row: bytes read per layer, achieved GB/s and GFLOP/s, each
    as a % of the machine limit the bench measured (read bandwidth, matmul peak); empty when no row has one."""
    m = doc.get("machine", {})
    body = []
    for r in doc["results"]:
        rf = r.get("roofline") or {}
        if rf.get("achieved_gbs") is None:
            continue
        moe = r.get("moe_layer") or {}
        ms = 1e3 * ((r.get("step_s") or {}).get("mean") or 0.0)
        body.append([re.sub(r"\s+", " ", str(r["model"])), str(r["threads"]), r["test"], f"{ms:.1f}",
                     _fmt(rf.get("mbytes_per_layer"), ".4g"), _fmt(rf["achieved_gbs"], ".3g"), _fmt(rf["pct_of_bandwidth"], ".3g"),
                     _fmt(rf["gflop"], ".3g"), _fmt(rf["achieved_gflops"], ".3g"), _fmt(rf["pct_of_matmul_peak"], ".3g"),
                     str(rf.get("bound", "")),
                     f"{moe['experts']:.1f}, {moe['mbytes']:.4g}, {moe['floor_ms']:.3g}" if moe else ""])
    if not body:
        return ""
    head = list(ROOF_COLUMNS)
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(x)) + " |" for x in [head] + body]
    limits = (f"limits measured by the bench: read {m.get('read_gbs', m.get('bandwidth_gbs', '?'))} GB/s "
              f"({m.get('read_probe', 'copy probe')}), matmul {m.get('matmul_gflops', '?')} GFLOP/s "
              f"({m.get('matmul_probe', '?')})")
    return "\n".join(lines[:1] + ["| " + " | ".join("-" * n for n in w) + " |"] + lines[1:] + [limits])


def quality_table(rows: list[dict[str, Any]]) -> str:
    head = ["file", "size", "x reference", "max |Δlogit|", "p50 row max", "mean |Δlogit|", "argmax agree"]
    body = [[re.sub(r".*/", "", r["path"]), _gib(r["size_bytes"]), f"{r['size_vs_reference']:.3f}",
             f"{r['logit_max_abs_err']:.3f}", f"{r['logit_p50_row_max_err']:.3f}", f"{r['logit_mean_abs_err']:.4f}",
             f"{r['argmax_agreement']:.3f}"] for r in rows]
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(x)) + " |" for x in [head] + body]
    return "\n".join(lines[:1] + ["| " + " | ".join("-" * n for n in w) + " |"] + lines[1:])


def flat(r: dict[str, Any]) -> dict[str, Any]:
    """A result row as one level of scalars (CSV)."""
    out: dict[str, Any] = {}
    for k, v in r.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if not isinstance(v2, (dict, list)):
                    out[f"{k}.{k2}"] = v2
        elif isinstance(v, list):
            out[k] = " ".join(map(str, v))
        else:
            out[k] = v
    return out


def to_csv(doc: dict[str, Any]) -> str:
    rows = [flat(r) for r in doc["results"]]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    wr.writeheader()
    wr.writerows(rows)
    return buf.getvalue()


def _key(r: dict[str, Any]) -> tuple[str, int, str]:
    return (re.sub(r".*/", "", str(r.get("path", r["model"]))), int(r["threads"]), str(r["test"]))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def check_doc(doc: Any) -> str | None:
    """Why ``doc`` cannot be a ``dllm bench --json`` document (naming the field), or None.

    Checks what ``compare`` reads: ``results`` rows with a model/path string, integer threads, a test name,
    a non-negative ``tps`` and an optional ``step_s.mean``.
    """
    if not isinstance(doc, dict):
        return f"the top level is a JSON {type(doc).__name__}, not an object"
    rows = doc.get("results")
    if not isinstance(rows, list):
        return "it has no \"results\" list"
    for i, r in enumerate(rows):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            return f"{where} is not an object"
        name = r.get("path", r.get("model"))
        if not isinstance(name, str):
            return f"{where} has no \"model\" or \"path\" string"
        if not isinstance(r.get("threads"), int) or isinstance(r.get("threads"), bool):
            return f"{where}.threads must be an integer"
        if not isinstance(r.get("test"), str):
            return f"{where}.test must be a string"
        if not _number(r.get("tps")):
            return f"{where}.tps must be a non-negative number"
        step = r.get("step_s")
        if step is not None and not (isinstance(step, dict) and (step.get("mean") is None or _number(step["mean"]))):
            return f"{where}.step_s must be an object with a non-negative \"mean\""
    return None


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows present in both runs (same file name, threads, test) with t/s and step-time deltas."""
    ib = {_key(r): r for r in b["results"]}
    out = []
    for r in a["results"]:
        o = ib.get(_key(r))
        if o is None:
            continue
        d = {"model": _key(r)[0], "threads": r["threads"], "test": r["test"], "tps_a": r["tps"], "tps_b": o["tps"],
             "tps_delta_pct": round(100 * (o["tps"] - r["tps"]) / r["tps"], 1) if r["tps"] else None}
        sa, sb = (r.get("step_s") or {}).get("mean"), (o.get("step_s") or {}).get("mean")
        if sa and sb:
            d.update(step_ms_a=round(1e3 * sa, 2), step_ms_b=round(1e3 * sb, 2),
                     step_delta_pct=round(100 * (sb - sa) / sa, 1))
        out.append(d)
    return out


def compare_table(rows: Iterable[dict[str, Any]]) -> str:
    head = ["model", "threads", "test", "t/s A", "t/s B", "Δ t/s %", "step ms A", "step ms B", "Δ step %"]
    body = [[str(r["model"]), str(r["threads"]), r["test"], f"{r['tps_a']:.2f}", f"{r['tps_b']:.2f}",
             _fmt(r["tps_delta_pct"], "+.1f"), _fmt(r.get("step_ms_a")), _fmt(r.get("step_ms_b")),
             _fmt(r.get("step_delta_pct"), "+.1f")] for r in rows]
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return "\n".join("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(x)) + " |" for x in [head] + body)


def estimate_layers(results: list[dict[str, Any]], target: int) -> list[dict[str, Any]]:
    """Linear fit of time per token and step time in the layer count, for the same file family measured at
    two or more depths (``...-L2-...`` and ``...-L4-...``): the MoE layers are identical, so each adds a
    constant cost. Returns estimate rows for ``target`` layers."""
    groups: dict[tuple[str, int, str], dict[int, dict[str, Any]]] = {}
    for r in results:
        fam = re.sub(r"-L\d+-", "-L*-", _key(r)[0])
        if "-L*-" in fam:
            groups.setdefault((fam, int(r["threads"]), r["test"]), {})[int(r["n_layers"])] = r
    out = []
    for (fam, threads, test), by in groups.items():
        if len(by) < 2 or target in by:
            continue
        (l0, r0), (l1, r1) = sorted(by.items())[0], sorted(by.items())[-1]

        def lin(y0: float, y1: float) -> float:
            return y0 + (y1 - y0) * (target - l0) / (l1 - l0)

        s0, s1 = (r0.get("step_s") or {}).get("mean"), (r1.get("step_s") or {}).get("mean")
        if not (r0["tps"] > r1["tps"] > 0) or (s0 and s1 and s1 <= s0):
            continue  # the deeper model was not slower: noise, no meaningful per-layer cost to extrapolate
        sec_per_tok = lin(1 / r0["tps"], 1 / r1["tps"])
        out.append({"model": fam.replace("-L*-", f"-L{target}-"), "backend": r1["backend"], "threads": threads,
                    "test": test, "n_layers": target, "from_layers": [l0, l1],
                    "tps": round(1 / sec_per_tok, 3) if sec_per_tok > 0 else 0.0,
                    "step_s": round(lin(s0, s1), 5) if s0 and s1 else None,
                    "method": f"linear in layers from L={l0} and L={l1}"})
    return out
