"""The one markdown table `scripts/gpu_check.sh` prints last: the GPU tests' outcome, then every bench run.

    python -m benchmarks.gpu_report OUT_DIR PART...   # reads OUT_DIR/gpu-tests.xml and OUT_DIR/bench-PART.json

A part that did not run (or stopped at its time limit) is a row saying so, never a missing row.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from .memory import GB
from .report import peer_rows, ways_cell

HEADERS = ("part", "config", "outcome", "GPU peak GB: one clip / long batches", "TTFT ms (30 s clip)",
           "greedy tok/s compiled / graph / eager", "beam-4 steps/s compiled / graph / eager", "compile s",
           "s per audio hour", "live latency s")  # fmt: skip


def tests_row(junit: Path) -> list[str]:
    """`pytest -m gpu`: passed / failed / skipped counts and its time, from the JUnit XML it wrote."""
    if not junit.exists():
        return ["pytest -m gpu", "", "did not finish (no report)", *[""] * (len(HEADERS) - 3)]
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    seconds = float(suite.get("time", 0))
    outcome = f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped in {seconds:.0f} s"
    return ["pytest -m gpu", "", outcome, *[""] * (len(HEADERS) - 3)]


def _median(value) -> float | None:
    return None if value is None else value["median"]


def _compile_s(run: dict) -> str:
    """The start cost of compiling the greedy and the beam step (one shape each)."""
    paid = [(run.get(key) or {}).get("compile_s") for key in ("decode", "decode_beams")]
    return " + ".join(f"{s:.0f}" for s in paid if s is not None)


def run_row(report: dict, run: dict) -> list[str]:
    label = run["config"]["label"]
    if "error" in run or "skipped" in run:
        return [report["target"], label, run.get("error") or f"skipped: {run['skipped']}", *[""] * (len(HEADERS) - 3)]
    by_part = run.get("gpu_peak_by_measurement") or (run.get("memory") or {}).get("gpu_peak_by_measurement") or {}
    # one clip (stages, TTFT, decoding, ask, live) apart from long audio's batches, whose KV cache is rows x beams
    single = [peak["allocated"] for part, peak in by_part.items() if part != "long_audio"]
    batched = by_part.get("long_audio", {}).get("allocated")
    memory = " / ".join(f"{b / GB:.2f}" for b in (max(single) if single else None, batched) if b is not None)
    first = _median((run.get("first_token") or {}).get("first_token_s"))
    long = run.get("long_audio")
    per_hour = 3600 / list(long["by_batch_size"].values())[-1]["audio_s_per_s"] if long else None
    live = _median((run.get("live") or {}).get("latency_s"))
    return [
        report["target"],
        label,
        f"incomplete: {run['incomplete']}" if "incomplete" in run else "ok",
        memory,
        "" if first is None else f"{first * 1000:.0f}",
        ways_cell(run.get("decode")),
        ways_cell(run.get("decode_beams")),
        _compile_s(run),
        "" if per_hour is None else f"{per_hour:.0f}",
        "" if live is None else f"{live:.2f}",
    ]


def peer_table_rows(report: dict) -> list[list[str]]:
    """The peer as rows of the same table: its TTFT and greedy tok/s, and SALMONN's speed over it."""
    if not report.get("peers"):
        return []
    headers, rows = peer_rows(report)
    out = []
    for peer, row in zip(report["peers"], rows, strict=True):
        cell = dict(zip(headers, row, strict=True))
        if "error" in peer:
            out.append(["peer", peer["config"]["label"], peer["error"], *[""] * (len(HEADERS) - 3)])
            continue
        ratio = f"SALMONN greedy {cell['greedy tok/s ratio']} its tok/s, TTFT {cell['TTFT ratio']} faster"
        first = f"{peer['first_token_s'] * 1000:.0f}"
        peak = peer.get("gpu_peak")
        out.append([peer["peer"], peer["config"]["label"], ratio, f"{peak['allocated'] / GB:.2f}" if peak else "",
                    first, cell["peer greedy tok/s"], "", "", "", ""])  # fmt: skip
    return out


def table(folder: Path, parts: list[str]) -> str:
    """The table for the bench parts named (each `bench-PART.json` in `folder`), after the tests' row."""
    rows = [tests_row(folder / "gpu-tests.xml")]
    for part in parts:
        path = folder / f"bench-{part}.json"
        if not path.exists():
            rows.append([part, "", "did not finish within its time limit (no report)", *[""] * (len(HEADERS) - 3)])
            continue
        report = json.loads(path.read_text())
        rows += [run_row(report, run) for run in report["runs"]]
        rows += peer_table_rows(report)
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    folder, *parts = argv if argv is not None else sys.argv[1:]
    print(table(Path(folder), parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
