"""Caption scores as audio-captioning papers compute them: the COCO caption toolkit (pycocoevalcap), whose PTB
tokeniser, METEOR 1.5 and SPICE are Java programs it ships. Where Java is missing the scores are not computed
and the summary says why; SPICE (and so SPIDEr) is offered only where it can run: Java 8 to 13, and Stanford
CoreNLP 3.6.0, which the toolkit downloads on first use."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..audio import decoder_chatter_silenced
from ..errors import DependencyError
from .metrics import Score, Scored, clean_answer, eval_extra_hint

SPICE_NEWEST_JAVA = 13  # SPICE 1.0 fails on newer runtimes (InaccessibleObjectException on String.value)
_CORENLP_JAR = "stanford-corenlp-3.6.0.jar"


@dataclass(frozen=True)
class JavaRuntime:
    """The `java` on PATH, if any, and its major version."""

    path: str | None
    major: int | None = None

    @property
    def describe(self) -> str:
        return "none" if self.path is None else f"Java {self.major} ({self.path})"


def find_java() -> JavaRuntime:
    path = shutil.which("java")
    if path is None:
        return JavaRuntime(None)
    try:
        banner = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return JavaRuntime(None)
    found = re.search(r'version "(\d+)(?:\.(\d+))?', banner)
    if found is None:
        return JavaRuntime(path)
    major = int(found.group(1))
    return JavaRuntime(path, int(found.group(2)) if major == 1 and found.group(2) else major)  # "1.8" is Java 8


def java_problem(java: JavaRuntime) -> str | None:
    if java.path is None:
        return "needs a Java runtime (no `java` on PATH): install one, e.g. apt install default-jre-headless"
    return None


def spice_problem(java: JavaRuntime, offline: bool) -> str | None:
    """Why SPICE cannot run here, or None."""
    if java.path is None:
        return java_problem(java)
    if java.major is not None and java.major > SPICE_NEWEST_JAVA:
        return f"SPICE 1.0 needs Java 8 to {SPICE_NEWEST_JAVA}; this machine has Java {java.major}"
    if not (_toolkit_folder() / "spice" / "lib" / _CORENLP_JAR).is_file() and offline:
        return "SPICE downloads Stanford CoreNLP 3.6.0 on first use, and this run is offline"
    return None


def _toolkit_folder() -> Path:
    try:
        import pycocoevalcap
    except ImportError:
        raise DependencyError(eval_extra_hint("the COCO caption toolkit (pycocoevalcap)")) from None
    return Path(next(iter(pycocoevalcap.__path__)))  # a namespace package: no __init__, no __file__


def check_toolkit() -> None:
    """Refuse before any model loads when the toolkit is not installed."""
    _toolkit_folder()


def caption_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str], *, music: bool,
                   java: JavaRuntime, offline: bool) -> Scored:  # fmt: skip
    """AudioCaps' METEOR, CIDEr-D, SPICE and SPIDEr (x100), or MusicCaps' BLEU-4 and ROUGE-L (x100)."""
    wanted = ("BLEU-4", "ROUGE-L") if music else ("METEOR", "CIDEr-D", "SPICE", "SPIDEr")
    count = len(hypotheses)
    problem = java_problem(java)
    if problem is not None:
        return Scored(tuple(Score(m, None, count, "x100", True, note=problem) for m in wanted))
    refs, hyps = _tokenized(references, hypotheses)
    per_item: list[dict[str, float]] = [{} for _ in hyps]
    scores = []

    def add(metric: str, value: float, item_values, how: str) -> None:
        scores.append(Score(metric, round(100 * float(value), 4), count, "x100", True, how))
        for row, item_value in zip(per_item, item_values, strict=True):
            row[metric] = round(100 * float(item_value), 4)

    if music:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge

        bleus, bleu_items = Bleu(4).compute_score(refs, hyps, verbose=0)
        add("BLEU-4", bleus[3], bleu_items[3], "pycocoevalcap Bleu(4), closest reference length")
        add("ROUGE-L", *Rouge().compute_score(refs, hyps), "pycocoevalcap Rouge (ROUGE-L, beta 1.2)")
    else:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor

        add("METEOR", *Meteor().compute_score(refs, hyps), "METEOR 1.5 (-l en -norm) via pycocoevalcap")
        cider, cider_items = Cider().compute_score(refs, hyps)
        add("CIDEr-D", cider, cider_items, "pycocoevalcap Cider (CIDEr-D, sigma 6)")
        scores += _spice_and_spider(refs, hyps, cider, cider_items, per_item, java, offline)
    items = tuple({"scores": row, "normalized": {"references": refs[k], "hypothesis": hyps[k][0]}}
                  for k, row in enumerate(per_item))  # fmt: skip
    return Scored(tuple(scores), items)


def _spice_and_spider(refs, hyps, cider, cider_items, per_item, java, offline) -> list[Score]:
    count = len(hyps)
    problem = spice_problem(java, offline)
    if problem is not None:
        return [Score(m, None, count, "x100", True, note=problem) for m in ("SPICE", "SPIDEr")]
    from pycocoevalcap.spice.spice import Spice

    try:
        with decoder_chatter_silenced():  # its download progress and the parser's log
            spice, spice_items = Spice().compute_score(refs, hyps)
    except (OSError, subprocess.CalledProcessError) as exc:
        note = f"SPICE failed: {exc}"
        return [Score(m, None, count, "x100", True, note=note) for m in ("SPICE", "SPIDEr")]
    spice_values = [item["All"]["f"] for item in spice_items]
    for row, s, c in zip(per_item, spice_values, cider_items, strict=True):
        row["SPICE"] = round(100 * s, 4)
        row["SPIDEr"] = round(50 * (s + c), 4)
    return [
        Score("SPICE", round(100 * float(spice), 4), count, "x100", True, "SPICE 1.0 via pycocoevalcap"),
        Score("SPIDEr", round(50 * (float(spice) + float(cider)), 4), count, "x100", True, "(CIDEr-D + SPICE) / 2"),
    ]


def _tokenized(references, hypotheses) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """References and answers through the toolkit's PTB tokeniser (lower case, punctuation dropped), keyed
    by item. An empty answer stays empty: the tokeniser reads lines and would drop a trailing empty one."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {k: [{"caption": r} for r in refs] for k, refs in enumerate(references)}
    answers = {k: clean_answer(h) for k, h in enumerate(hypotheses)}
    res = {k: [{"caption": a}] for k, a in answers.items() if a}
    with decoder_chatter_silenced():  # the tokeniser reports its speed on stderr
        refs = PTBTokenizer().tokenize(gts)
        hyps = PTBTokenizer().tokenize(res) if res else {}
    return refs, {k: hyps.get(k, [""]) for k in range(len(hypotheses))}
