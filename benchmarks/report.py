"""Bench results as JSON, rich tables (one per run, one summary) and a markdown table for the README."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .memory import GB
from .results import Stat

# summary columns: (header, how to read it from one run)
_SUMMARY: tuple[tuple[str, Any], ...] = (
    ("config", lambda r: r["config"]["label"]),
    ("load s", lambda r: _num(r.get("load_s"), 1)),
    ("host RSS peak loading GB", lambda r: _gb(_mem(r, "load_peak_rss_bytes"))),
    ("model GB", lambda r: _gb(_mem(r, "model_bytes"))),
    ("load RSS / model", lambda r: _num(_mem(r, "load_rss_over_model"), 2)),
    ("GPU peak alloc / reserved GB", lambda r: _gpu(r)),
    ("Whisper s", lambda r: _median(r, "stages", "whisper_s")),
    ("BEATs s", lambda r: _median(r, "stages", "beats_s")),
    ("connector s", lambda r: _median(r, "stages", "connector_s", digits=3)),
    ("TTFT s", lambda r: _median(r, "first_token", "first_token_s")),
    ("greedy tok/s", lambda r: _num((r.get("decode") or {}).get("tokens_per_s"), 2)),
    ("greedy compiled / graph / eager tok/s", lambda r: ways_cell(r.get("decode"))),
    ("compile s", lambda r: _num((r.get("decode") or {}).get("compile_s"), 1)),
    ("read GB/s", lambda r: _num((r.get("decode") or {}).get("read_bandwidth_gb_s"), 1)),
    ("P9 (greedy, share of bandwidth)", lambda r: _num((r.get("decode") or {}).get("p9"), 2)),
    ("beam-4 steps/s", lambda r: _num((r.get("decode_beams") or {}).get("tokens_per_s"), 2)),
    ("beam-4 compiled / graph / eager steps/s", lambda r: ways_cell(r.get("decode_beams"))),
    ("ask s", lambda r: _median(r, "ask", "total_s")),
    ("long audio x", lambda r: _long_audio(r)),
    ("s per audio hour", lambda r: _per_hour(r)),
    ("live latency s", lambda r: _median(r, "live", "latency_s")),
)


def jsonable(value: Any) -> Any:
    """Stats and dataclasses become dicts, recursively."""
    if isinstance(value, Stat):
        return asdict(value)
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


STEP_WAYS = ("compiled", "graph", "eager")


def ways_cell(decode: dict | None) -> str:
    """`compiled / graph / eager` speeds of one decode measurement; `-` for a way this device has not (graphs off
    CUDA), `failed` for one that failed."""
    if not decode:
        return ""
    by_step = decode.get("by_step") or {}

    def one(way: str) -> str:
        if way not in by_step:
            return "-"
        return "failed" if "failed" in by_step[way] else f"{by_step[way]['tokens_per_s']:.1f}"

    return " / ".join(one(way) for way in STEP_WAYS)


def _mem(run: dict, key: str) -> Any:
    return (run.get("memory") or {}).get(key)


def _num(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _gb(value: Any) -> str:
    return "" if value is None else f"{value / GB:.2f}"


def _median(run: dict, group: str, key: str, digits: int = 2) -> str:
    stat = (run.get(group) or {}).get(key)
    if stat is None:
        return ""
    median = stat.median if isinstance(stat, Stat) else stat["median"]
    return f"{median:.{digits}f}"


def _gpu(run: dict) -> str:
    peak = _mem(run, "gpu_peak")
    partial = list((run.get("gpu_peak_by_measurement") or {}).values())  # a run stopped at its time limit
    if not peak and partial:
        peak = {key: max(p[key] for p in partial) for key in ("allocated", "reserved")}
    return "" if not peak else f"{peak['allocated'] / GB:.2f} / {peak['reserved'] / GB:.2f}"


def _long_audio(run: dict) -> str:
    long = run.get("long_audio")
    if not long:
        return ""
    return " / ".join(f"{size}: {item['audio_s_per_s']:.1f}" for size, item in long["by_batch_size"].items())


def _per_hour(run: dict) -> str:
    """Wall seconds one hour of audio takes at the largest batch size measured (3600 / audio seconds per second)."""
    long = run.get("long_audio")
    if not long:
        return ""
    return f"{3600 / list(long['by_batch_size'].values())[-1]['audio_s_per_s']:.0f}"


def summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, one row per run); a run that failed or was skipped says why in its second cell."""
    headers = [name for name, _ in _SUMMARY]
    rows = []
    for run in report["runs"]:
        if "error" in run or "skipped" in run:
            why = run.get("error") or f"skipped: {run['skipped']}"
            rows.append([run["config"]["label"], why] + [""] * (len(headers) - 2))
        else:
            row = [read(run) for _, read in _SUMMARY]
            if "incomplete" in run:  # stopped at its time limit: what it measured, and why the rest is missing
                row[0] += f" (incomplete: {run['incomplete']})"
            rows.append(row)
    return headers, rows


def markdown(report: dict) -> str:
    """The summary as a markdown table, with the machine it was measured on (and the peer's table, if run)."""
    headers, rows = summary_rows(report)
    machine = report["machine"]
    lines = [
        f"Model `{report['target']}` on {machine['description']}; {report['options_text']}.",
        "",
        *_table(headers, rows),
    ]
    if report.get("peers"):
        lines += ["", *_table(*peer_rows(report))]
    return "\n".join(lines)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]


def peer_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The peer beside SALMONN: per peer run, SALMONN's run on the same device and quantisation, and the ratios."""
    headers = ["peer", "prompt tokens", "peer TTFT s", "peer greedy tok/s", "SALMONN run", "SALMONN TTFT s",
               "SALMONN greedy tok/s", "greedy tok/s ratio", "TTFT ratio"]  # fmt: skip
    rows = []
    for peer in report["peers"]:
        label = peer["config"]["label"]
        if "error" in peer:
            rows.append([label, peer["error"]] + [""] * (len(headers) - 2))
            continue
        ours = next((r for r in report["runs"] if _same_setting(r, peer) and "error" not in r and "skipped" not in r),
                    None)  # fmt: skip
        our_speed = ((ours or {}).get("decode") or {}).get("tokens_per_s")
        first = (ours or {}).get("first_token", {}).get("first_token_s")
        our_first = None if first is None else (first.median if isinstance(first, Stat) else first["median"])
        speed_ratio = our_speed / peer["tokens_per_s"] if our_speed and peer.get("tokens_per_s") else None
        first_ratio = peer["first_token_s"] / our_first if our_first else None
        rows.append([
            f"{peer['peer']} {label}", str(peer["prompt_tokens"]), _num(peer["first_token_s"], 3),
            _num(peer.get("tokens_per_s"), 2), ours["config"]["label"] if ours else "", _num(our_first, 3),
            _num(our_speed, 2), "" if speed_ratio is None else f"{speed_ratio:.2f}x",
            "" if first_ratio is None else f"{first_ratio:.2f}x",
        ])  # fmt: skip
    return headers, rows


def _same_setting(run: dict, peer: dict) -> bool:
    return run["config"]["device"] == peer["config"]["device"] and run["config"]["quant"] == peer["config"]["quant"]


def print_tables(report: dict) -> None:
    """One detailed table per run (median, min, max of every timed value), then the summary."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for run in report["runs"]:
        if "error" in run or "skipped" in run:
            continue
        table = Table(title=f"SALMONN bench: {run['model']} {run['config']['label']}")
        for column in ("measurement", "median", "min", "max"):
            table.add_column(column, justify="left" if column == "measurement" else "right")
        table.add_row("load_s", f"{run['load_s']:.3f}", "", "")
        for key, value in run.items():
            if key not in ("config", "memory", "model", "device", "dtype", "llm_dtype", "load_s"):
                _rows(table, key, value)
        console.print(table)
    if report.get("cli_help_s"):
        help_s = report["cli_help_s"]
        console.print(f"salmonn --help: {help_s.median:.3f} s (min {help_s.min:.3f}, max {help_s.max:.3f})")
    if report.get("peers"):
        headers, rows = peer_rows(report)
        peers = Table(title="Peer, same device and quantisation (ratios: SALMONN's speed / the peer's)")
        for header in headers:
            peers.add_column(header, overflow="fold")
        for row in rows:
            peers.add_row(*row)
        console.print(peers)
    headers, rows = summary_rows(report)
    table = Table(title=f"Summary: {report['target']} on {report['machine']['description']}")
    table.add_column("")  # one column per configuration: narrow terminals still show every figure
    for row in rows:
        table.add_column(row[0], justify="right", overflow="fold")
    for i, header in enumerate(headers[1:], start=1):
        table.add_row(header, *(row[i] for row in rows))
    console.print(table)


def _rows(table, prefix: str, value: Any) -> None:
    if isinstance(value, Stat):
        table.add_row(prefix, f"{value.median:.4f}", f"{value.min:.4f}", f"{value.max:.4f}")
    elif isinstance(value, dict) and set(value) == {"median", "min", "max", "runs"}:
        table.add_row(prefix, f"{value['median']:.4f}", f"{value['min']:.4f}", f"{value['max']:.4f}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _rows(table, f"{prefix}.{key}", item)
    elif isinstance(value, float):
        table.add_row(prefix, f"{value:.2f}", "", "")
