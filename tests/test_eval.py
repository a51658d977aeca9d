"""`salmonn eval`: the metrics against their libraries on fixed strings and corpora of known size, and the
command end to end on tiny components with espeak speech (the summary agrees with jiwer on items.jsonl; a run
killed with SIGKILL and resumed scores each item once; bad input is one line before the model loads)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import jiwer
import pytest
import sacrebleu
import soundfile as sf
from whisper_normalizer.english import EnglishTextNormalizer

from salmonn_cli.audio import SAMPLE_RATE
from salmonn_cli.errors import UsageError
from salmonn_cli.evaluation import captions, metrics

from .speech import espeak
from .watch import FolderWatch

FAST = ["--device", "cpu", "--quant", "none", "--beams", "1"]
SENTENCES = ("hello world", "the cat sat on the mat", "good morning to you", "it is raining today")


def salmonn(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("salmonn")
    assert exe, "the salmonn console script is not installed (pip install -e .)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


# -- error rates ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reference", "hypothesis"), [
    ("Hello, World!", "hello world"),  # casing and punctuation
    ("I don't have twenty-five dollars.", "I do not have $25"),  # contractions, numbers and currency
    ("It's ONE HUNDRED percent", "it is 100%"),
    ("Mr. Jones, we're gonna go", "mister jones we are going to go"),  # abbreviations, colloquial forms
    ("<s>the colour grey</s>", "the color gray"),  # SALMONN's sentence markers, British spelling
])  # fmt: skip
def test_english_normalisation_makes_equivalent_writings_equal(reference, hypothesis):
    scored = metrics.error_rate([reference], [hypothesis], "en")
    assert scored.scores[0].value == 0.0, scored.items
    assert scored.items[0]["normalized"]["reference"] == EnglishTextNormalizer()(reference.replace("<s>", ""))


def test_wer_is_jiwer_over_the_corpus_not_a_mean_of_items():
    refs, hyps = ["a b c d", "e"], ["a b c d", "f"]
    score = metrics.error_rate(refs, hyps, "en").scores[0]
    assert score.metric == "WER" and score.value == pytest.approx(100 * jiwer.wer(refs, hyps)) == 20.0
    # a corpus of known size: 50 references of 4 words, one word wrong in every fifth answer -> 10 / 200 words
    refs = ["alpha beta gamma delta"] * 50
    hyps = ["alpha beta omega delta" if k % 5 == 0 else "alpha beta gamma delta" for k in range(50)]
    score = metrics.error_rate(refs, hyps, "en").scores[0]
    assert (score.value, score.count) == (5.0, 50)


def test_chinese_is_scored_by_characters_without_punctuation():
    score = metrics.error_rate(["你好，世界！"], ["你好世"], "zh").scores[0]
    assert score.metric == "CER" and score.value == pytest.approx(100 * jiwer.cer("你好世界", "你好世")) == 25.0
    assert metrics.error_rate(["你好，世界！"], ["你好 世界"], "zh").scores[0].value == 0.0


def test_phone_error_rate_counts_phones():
    score = metrics.phone_error_rate(["HH AH0 L OW1", "W ER1 L D"], ["hh ah0 l ow1", "w er1 d"]).scores[0]
    assert (score.metric, score.value) == ("PER", 12.5)  # one phone of eight deleted


# -- BLEU ----------------------------------------------------------------------------------------------------------


def test_bleu_is_sacrebleu_with_the_target_languages_tokeniser_and_its_signature():
    hyps = ["我爱北京天安门", "今天天气很好"]
    refs = [["我爱北京天安门。"], ["今天的天气很好。"]]
    tokenize = metrics.bleu_tokenizer("zh", None)
    score = metrics.bleu(refs, hyps, tokenize).scores[0]
    expected = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]], tokenize="zh")
    assert score.value == pytest.approx(expected.score, abs=1e-4)
    assert "tok:zh" in score.signature and "nrefs:1" in score.signature
    assert metrics.bleu_tokenizer("ja", None) == "ja-mecab" and metrics.bleu_tokenizer("de", None) == "13a"
    assert metrics.bleu_tokenizer("de", "intl") == "intl"
    ja = metrics.bleu([["私は学生です"]], ["私は学生です"], "ja-mecab").scores[0]
    assert ja.value == pytest.approx(100.0) and "tok:ja-mecab" in ja.signature


def test_bleu_takes_several_references_and_counts_the_corpus():
    english = ["the cat is on the mat", "there is a dog in the garden"] * 20  # 40 answers
    refs = [["the cat is on the mat", "a cat sits on the mat"], ["a dog is in the garden"]] * 20
    score = metrics.bleu(refs, english, "13a").scores[0]
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert score.value == pytest.approx(sacrebleu.corpus_bleu(english, streams).score, abs=1e-4)
    assert score.count == 40 and "nrefs:var" in score.signature


# -- closed answers ------------------------------------------------------------------------------------------------


def test_label_accuracy_reads_one_word_answers_and_sentences_naming_one_label():
    refs = ["happy", "sad", "Neutral", "angry", "happy"]
    hyps = ["Happy.", "The speaker sounds sad.", "neutral", "happy or angry", "I cannot tell"]
    scored = metrics.label_accuracy(refs, hyps)
    accuracy, following = scored.scores
    assert [item["predicted"] for item in scored.items] == ["happy", "sad", "neutral", None, None]
    assert (accuracy.value, following.value) == (0.6, 0.6)


def test_yes_no_accuracy_takes_the_first_yes_or_no():
    scored = metrics.yes_no_accuracy(["yes", "no", "yes", "no"], ["Yes, it is.", "No.", "I think so", "yes"])
    assert [item["predicted"] for item in scored.items] == ["yes", "no", None, "yes"]
    assert [s.value for s in scored.scores] == [0.5, 0.75]


def test_a_yes_no_task_refuses_other_references():
    metrics.check_yes_no(["Yes", "no."])
    with pytest.raises(UsageError, match="yes"):
        metrics.check_yes_no(["yes", "maybe"])


def test_contains_accuracy_finds_a_reference_answer_as_whole_words():
    scored = metrics.contains_accuracy([["Paris"], ["1969", "nineteen sixty-nine"], ["cat"]],
                                       ["The capital is Paris.", "It was in 1969", "a category"])  # fmt: skip
    assert [item["scores"]["Accuracy"] for item in scored.items] == [1.0, 1.0, 0.0]


# -- captions (Java) -----------------------------------------------------------------------------------------------


def test_caption_scores_are_the_coco_toolkits_and_java_is_required_not_crashed(tmp_path, monkeypatch):
    java = captions.find_java()
    assert java.path is not None, "the caption metrics need a Java runtime (CI installs default-jre-headless)"
    refs = [["A man speaks while birds chirp.", "A man talks and birds sing"], ["Rain falls on a roof."]]
    scored = captions.caption_scores(refs, ["a man speaks while birds chirp", ""], music=False, java=java,
                                     offline=True)  # fmt: skip
    by_metric = {s.metric: s for s in scored.scores}
    assert by_metric["METEOR"].value > 0 and by_metric["CIDEr-D"].value > 0
    item_meteor = [item["scores"]["METEOR"] for item in scored.items]
    assert item_meteor[0] > 90 and item_meteor[1] == 0.0  # the right caption, and the empty answer
    if java.major > captions.SPICE_NEWEST_JAVA:
        assert by_metric["SPIDEr"].value is None and "Java 8 to 13" in by_metric["SPIDEr"].note
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    missing = captions.find_java()
    assert missing.path is None
    unscored = captions.caption_scores(refs, ["x", "y"], music=True, java=missing, offline=True)
    assert [s.value for s in unscored.scores] == [None, None]
    assert all("Java runtime" in s.note for s in unscored.scores)


def test_spice_is_offered_only_where_it_can_run():
    assert "Java runtime" in captions.spice_problem(captions.JavaRuntime(None), offline=False)
    assert "Java 8 to 13" in captions.spice_problem(captions.JavaRuntime("/usr/bin/java", 17), offline=False)
    offline = captions.spice_problem(captions.JavaRuntime("/usr/bin/java", 11), offline=True)
    corenlp = Path(next(iter(__import__("pycocoevalcap").__path__))) / "spice" / "lib" / "stanford-corenlp-3.6.0.jar"
    assert (offline is None) == corenlp.is_file()
    if not corenlp.is_file():
        assert "Stanford CoreNLP" in offline


# -- the command ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> Path:
    """A manifest of espeak utterances with their text as references."""
    folder = tmp_path_factory.mktemp("testset")
    lines = []
    for k, text in enumerate(SENTENCES):
        sf.write(folder / f"utt{k}.wav", espeak(text), SAMPLE_RATE)
        lines.append(json.dumps({"audio": f"utt{k}.wav", "reference": text.capitalize() + "."}))
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "test.jsonl"


def _model(tiny: Path) -> list[str]:
    return ["--model", tiny / "model.toml", *FAST]


def _jiwer_on_items(out: Path) -> tuple[float, list[dict]]:
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    normalise = EnglishTextNormalizer()
    refs = [normalise(r["reference"]) for r in rows]
    hyps = [normalise(r["hypothesis"].replace("<s>", " ").replace("</s>", " ")) for r in rows]
    return 100 * jiwer.wer(refs, hyps), rows


@pytest.fixture(scope="module")
def alone(tiny, test_set, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One process's evaluation of the test set (what a launched job must equal)."""
    out = tmp_path_factory.mktemp("alone") / "ls"
    done = salmonn("eval", test_set, "--task", "asr", "--paper", "librispeech-test-clean", "-o", out, *_model(tiny),
                   "--max-new-tokens", "6")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out, done


def test_eval_asr_summary_equals_jiwer_on_its_items_and_names_model_and_settings(tiny, test_set, alone):
    out, done = alone
    summary = json.loads((out / "summary.json").read_text())
    wer, rows = _jiwer_on_items(out)
    assert [r["audio"] for r in rows] == [str(test_set.parent / f"utt{k}.wav") for k in range(len(SENTENCES))]
    (score,) = summary["metrics"]
    assert score["metric"] == "WER" and score["count"] == len(SENTENCES)
    assert score["value"] == pytest.approx(wer, abs=1e-3)
    assert summary["model"]["model"] == "tiny" and summary["model"]["decode"]["max_new_tokens"] == 6
    assert summary["settings"]["quant"] == "none" and summary["paper"]["figures"][0]["value"] == 2.1
    assert summary["versions"]["salmonn-cli"] and summary["versions"]["jiwer"] == version("jiwer")
    assert "WER" in done.stdout and "2.10%" in done.stdout and "EnglishTextNormalizer" in done.stdout
    assert "Traceback" not in done.stderr


def test_eval_under_torchrun_scores_once_what_one_process_scores(tiny, test_set, alone, tmp_path):
    out = tmp_path / "launched"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "salmonn_cli"]  # fmt: skip
    args = ["eval", test_set, "--task", "asr", "--paper", "librispeech-test-clean", "-o", out, *_model(tiny),
            "--max-new-tokens", "6"]  # fmt: skip
    done = subprocess.run(torchrun + [str(a) for a in args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("WER") == alone[1].stdout.count("WER")  # one table, from rank 0
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (out, alone[0]))
    assert ours["metrics"] == theirs["metrics"] and ours["answered"] == len(SENTENCES)
    assert (out / "items.jsonl").read_text() == (alone[0] / "items.jsonl").read_text()


def test_eval_refuses_to_mix_answers_made_with_other_settings(tiny, test_set, alone):
    out, _ = alone
    again = salmonn("eval", test_set, "--task", "asr", "-o", out, *_model(tiny), "--max-new-tokens", "7")
    assert again.returncode == 2 and "other settings" in again.stderr and "max_new_tokens" in again.stderr


def test_eval_killed_and_resumed_scores_each_item_once(tiny, test_set, tmp_path):
    out = tmp_path / "killed"
    answers = out / "answers"
    answers.mkdir(parents=True)
    command = [shutil.which("salmonn"), "eval", str(test_set), "--task", "asr", "-o", str(out),
               *map(str, _model(tiny)), "--max-new-tokens", "40"]  # fmt: skip
    with FolderWatch(answers) as watch:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            first = watch.next_name(".json", timeout=240)
            os.kill(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert first is not None, stderr
    assert proc.returncode == -signal.SIGKILL
    first_answer = (answers / first).read_bytes()
    killed_with = len(list(answers.glob("*.json")))
    assert killed_with < len(SENTENCES), "the run finished before it was killed"
    resumed = salmonn("eval", test_set, "--task", "asr", "-o", out, *_model(tiny), "--max-new-tokens", "40")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_with} already done" in resumed.stderr
    assert (answers / first).read_bytes() == first_answer  # not answered again
    wer, rows = _jiwer_on_items(out)
    assert sorted(r["audio"] for r in rows) == sorted({r["audio"] for r in rows})
    assert len(rows) == len(SENTENCES) and all(r["hypothesis"] is not None for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered"] == len(SENTENCES) and summary["metrics"][0]["count"] == len(SENTENCES)
    assert summary["metrics"][0]["value"] == pytest.approx(wer, abs=1e-3)


def test_bad_eval_input_is_one_line_before_the_model_loads(tiny, test_set, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"audio": "a.wav", "reference": "x"}\n{"audio": "b.wav"\n')
    no_reference = tmp_path / "noref.jsonl"
    no_reference.write_text('{"audio": "a.wav"}\n')
    repeated = tmp_path / "twice.jsonl"
    repeated.write_text('{"audio": "a.wav", "reference": "x"}\n{"audio": "a.wav", "reference": "y"}\n')
    cases = [
        ((bad_json, "--task", "asr"), "bad.jsonl:2: not valid JSON"),
        ((no_reference, "--task", "asr"), 'noref.jsonl:1: needs a "reference"'),
        ((repeated, "--task", "asr"), "give each audio once"),
        ((test_set, "--task", "sing"), "unknown --task 'sing'"),
        ((test_set, "--task", "asr", "--paper", "covost2-en-zh"), "for --task asr: gigaspeech-test"),
        ((test_set, "--task", "sv"), '"yes" or "no"'),
        ((test_set, "--task", "ast"), "needs a target language"),
        ((test_set, "--task", "ast", "--to", "de", "--bleu-tokenize", "nope"), "unknown --bleu-tokenize 'nope'"),
        ((test_set, "--task", "asr", "--bleu-tokenize", "zh"), "is for --task ast"),
        ((tmp_path / "none.jsonl", "--task", "asr"), "manifest not found"),
    ]
    for args, expected in cases:
        done = salmonn("eval", *args, "-o", tmp_path / "out", *_model(tiny))
        assert done.returncode in (2, 3), done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_eval_list_names_tasks_metrics_and_the_papers_figures():
    listed = salmonn("eval", "--list")
    assert listed.returncode == 0, listed.stderr
    for text in ("asr", "ast", "aac", "er", "sv", "sqqa", "METEOR", "BLEU-4", "librispeech-test-clean: WER 2.1",
                 "covost2-en-zh: BLEU-4 33.1*", "audiocaps-test: SPIDEr 40.3*", "not yet checked"):  # fmt: skip
        assert text in listed.stdout, listed.stdout
