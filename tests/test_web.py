"""The web page at `/` of `salmonn serve`, in a real browser: Debian's headless Chromium driven by Selenium, against
a real server on tiny components, with an API key (the page asks for it once).

What the page shows is compared with what the API answers for the same audio and settings. The microphone is
Chromium's fake capture device playing a speech file. Every wait has a deadline; a screenshot of each state goes
to the test's temporary folder. Without chromium and chromium-driver these tests fail: CI installs them.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.serve_process import ServeProcess
from tests.speech import long_speech, make_speech

KEY = "open-sesame"
WAIT_S = 120.0  # the longest any one state may take to appear (the tiny model answers in seconds)
DESKTOP, PHONE = (1280, 1000), (390, 844)
QUESTION = "What can you hear?"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _model(tiny: Path) -> list[str]:
    return ["--model", str(tiny / "model.toml"), "--device", "cpu", "--quant", "none"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("web_audio")
    short, _ = make_speech(["Please bring the red box to the kitchen"], [])
    long, _ = long_speech(6)
    microphone, _ = make_speech(["The train to the city leaves at nine"], [])
    files = {name: folder / f"{name}.wav" for name in ("short", "long", "microphone")}
    sf.write(files["short"], short, 16_000)
    sf.write(files["long"], long, 16_000)
    # Chromium's fake capture device plays a 16-bit PCM wav in a loop
    sf.write(files["microphone"], np.concatenate([microphone, np.zeros(8_000, np.float32)]), 16_000, subtype="PCM_16")
    files["not_audio"] = folder / "notes.txt"
    files["not_audio"].write_text("these are meeting notes, not a recording\n" * 20)
    return files


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    process = ServeProcess(*_model(tiny), "--max-new-tokens", "12", "--api-key", KEY,
                           log=tmp_path_factory.mktemp("web_serve") / "stderr.txt")  # fmt: skip
    yield process
    assert process.stop() == 0, process.stderr()


@pytest.fixture(scope="module")
def browser(clips):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    assert not missing, f"{', '.join(missing)} not found: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--use-fake-ui-for-media-stream",
                     "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-audio-capture={clips['microphone']}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # no Selenium Manager: offline
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


class Page:
    """The page in the browser, and the few ways a test reads and drives it."""

    def __init__(self, driver, url: str, shots: Path) -> None:
        self.driver, self.url, self.shots = driver, url, shots

    def open(self, size: tuple[int, int] = DESKTOP) -> None:
        self.driver.set_window_size(*size)
        self.driver.get(f"{self.url}/")
        self.wait(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), "the page to start")

    def wait(self, condition, what: str):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, WAIT_S, poll_frequency=0.05).until(condition)
        except TimeoutException:
            raise AssertionError(f"the page never showed {what}; browser log: {self.console()}") from None

    def console(self) -> list:
        try:
            return self.driver.get_log("browser")
        except Exception:  # noqa: BLE001 - a driver without logs: nothing more to say
            return []

    def find(self, css: str):
        return self.driver.find_element("css selector", css)

    def find_all(self, css: str) -> list:
        return self.driver.find_elements("css selector", css)

    def visible(self, element_id: str) -> bool:
        return self.find(f"#{element_id}").is_displayed()

    def enter_key(self, key: str) -> None:
        field = self.find("#key")
        field.clear()
        field.send_keys(key)
        self.find("#key-form button[type=submit]").click()

    def upload(self, path: Path) -> None:
        if self.visible("clip"):
            self.find("#new-clip").click()
        self.find("#file").send_keys(str(path))
        self.wait(lambda d: self.visible("controls"), "the controls after an upload")
        self.wait(lambda d: d.execute_script("return document.getElementById('player').readyState >= 1"),
                  "the clip in the audio element")  # fmt: skip

    def set_number(self, element_id: str, value: int) -> None:
        if not self.visible(element_id):
            self.find("#more summary").click()
        field = self.find(f"#{element_id}")
        field.clear()
        field.send_keys(str(value))

    def press(self, action: str) -> None:
        self.find(f"button[data-action={action}]").click()

    def finished_turn(self):
        """The newest answer, once it is done or has failed."""
        self.wait(lambda d: self.find(".turn").get_attribute("data-state") in ("done", "error"), "a finished answer")
        return self.find(".turn")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        assert path.stat().st_size > 0
        return path


@pytest.fixture()
def page(browser, server, tmp_path) -> Page:
    """The page, opened and past the key (kept in the tab's session storage after the first test gave it)."""
    page = Page(browser, server.url, tmp_path)
    page.open()
    if page.visible("key-form"):
        page.enter_key(KEY)
        page.wait(lambda d: not page.visible("key-form"), "the key accepted")
    return page


def _api(server: ServeProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT_S)


def _page_settings(server: ServeProcess) -> dict:
    return httpx.get(f"{server.url}/ui/config.json", timeout=30).json()


def _transcription(server: ServeProcess, path: Path, **fields) -> httpx.Response:
    """What the API answers for `path`, at the page's transcription LoRA scale unless `fields` name one."""
    lora = _page_settings(server)["actions"][0]["lora_scale"]
    with _api(server) as api:
        return api.post("/v1/audio/transcriptions", files={"file": (path.name, path.read_bytes())},
                        data={"model": "tiny", "lora_scale": str(lora), **fields})  # fmt: skip


# -- the page, its settings and the key -----------------------------------------------------------------------------
def test_the_page_and_its_settings_are_open_and_load_nothing_from_elsewhere(server, tiny):
    from salmonn_cli.cli.tasks import story_task
    from salmonn_cli.prompt import TASK_INSTRUCTIONS

    page = httpx.get(f"{server.url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy
    for asset in ("/ui/app.js", "/ui/app.css"):
        assert httpx.get(f"{server.url}{asset}", timeout=30).status_code == 200
        assert f'"{asset}"' in page.text
    assert "://" not in page.text  # every reference is to this server
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401  # the API keeps its key
    settings = _page_settings(server)
    assert settings["model"] == "tiny" and settings["needs_key"] is True
    assert settings["defaults"] == {"num_beams": 4, "max_tokens": 12}  # the server's --max-new-tokens
    actions = {a["name"]: a for a in settings["actions"]}
    assert list(actions) == ["transcribe", "translate", "caption", "story", "ask"]
    assert actions["caption"]["instruction"] == TASK_INSTRUCTIONS["caption"]
    assert actions["story"]["lora_scale"] == story_task().lora_scale  # as `salmonn story`
    assert actions["ask"]["lora_scale"] == settings["lora"]["trained"] and actions["ask"]["instruction"] is None


def test_the_key_is_asked_for_once(browser, server, tmp_path):
    page = Page(browser, server.url, tmp_path)
    page.open()
    assert page.visible("key-form") and not page.visible("picker")  # the clip waits behind the key
    page.enter_key("wrong")
    page.wait(lambda d: page.visible("key-error"), "the server's refusal of a wrong key")
    assert page.find("#key-error").text.startswith("a valid API key is needed")
    page.shot("key")
    page.enter_key(KEY)
    page.wait(lambda d: not page.visible("key-form"), "the key accepted")
    page.open()  # a reload: the tab keeps the key
    assert not page.visible("key-form")
    assert page.driver.execute_script("return sessionStorage.getItem('salmonn.api_key')") == KEY
    origins = page.driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert origins and set(origins) == {server.url}  # nothing from a CDN: it works offline


# -- answers ----------------------------------------------------------------------------------------------------
def test_an_uploaded_wav_gives_its_transcript(page, server, clips):
    page.upload(clips["short"])
    assert page.find("#clip-name").text == "short.wav"
    page.press("transcribe")
    turn = page.finished_turn()
    page.shot("transcript")
    assert turn.get_attribute("data-state") == "done" and turn.get_attribute("data-layout") == "text"
    expected = _transcription(server, clips["short"], num_beams="4", max_new_tokens="12")
    assert expected.status_code == 200, expected.text
    assert turn.find_element("css selector", ".answer").text == expected.json()["text"] != ""
    page.find("#translate-input").clear()
    page.find("#translate-input").send_keys("German")
    page.press("translate")
    page.wait(lambda d: len(page.find_all(".turn")) == 2, "the translation")
    translated = page.finished_turn()
    assert translated.find_element("css selector", "h2").text == "Translate into German"
    with _api(server) as api:
        german = api.post("/v1/audio/translations", files={"file": ("short.wav", clips["short"].read_bytes())},
                          data={"model": "tiny", "to_language": "German", "lora_scale": "4.0"})  # fmt: skip
    assert translated.find_element("css selector", ".answer").text == german.json()["text"]


def test_a_question_streams_in_and_a_follow_up_reuses_the_clip(page, server, clips):
    page.upload(clips["short"])
    page.set_number("beams", 1)  # one row: a delta per token
    page.set_number("max-tokens", 24)
    page.find("#ask-input").send_keys(QUESTION)
    encoded = server.health()["encoded"]
    # the length of the newest answer each time the page changes it, until it is done
    page.driver.execute_script("""
        window.grown = [];
        new MutationObserver(() => {
            const turn = document.querySelector('.turn');
            if (turn && turn.dataset.state === 'streaming')
                window.grown.push(turn.querySelector('.answer').textContent.length);
        }).observe(document.getElementById('turns'), {subtree: true, childList: true, characterData: true});
    """)
    page.press("ask")
    turn = page.finished_turn()
    page.shot("streamed")
    assert turn.get_attribute("data-state") == "done"
    grown = page.driver.execute_script("return window.grown")
    steps = [b for a, b in zip([0, *grown], grown, strict=False) if b > a]
    assert len(steps) >= 2, f"the answer did not grow while it streamed: {grown}"
    lora = _page_settings(server)["actions"][-1]["lora_scale"]
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clips["short"].read_bytes()).decode(),
                                                    "format": "wav"}}  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}, audio]}],
            "num_beams": 1, "max_tokens": 24, "lora_scale": lora}  # fmt: skip
    with _api(server) as api:
        expected = api.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert turn.find_element("css selector", ".answer").text == expected.strip()
    page.find("#ask-input").send_keys("And what else?\n")  # Enter asks too
    page.wait(lambda d: len(page.find_all(".turn")) == 2, "the follow-up question")
    assert page.finished_turn().get_attribute("data-state") == "done"
    assert server.health()["encoded"] == encoded + 1  # three answers about one clip: its audio encoded once


def test_long_audio_gives_timed_lines_and_a_click_seeks(page, server, clips):
    page.upload(clips["long"])
    page.press("transcribe")
    turn = page.finished_turn()
    assert turn.get_attribute("data-layout") == "segments"
    expected = _transcription(server, clips["long"], response_format="verbose_json", num_beams="4",
                              max_new_tokens="12").json()["segments"]  # fmt: skip
    lines = turn.find_elements("css selector", ".segments li")
    assert len(lines) == len(expected) >= 2
    for line, segment in zip(lines, expected, strict=True):
        assert line.find_element("css selector", ".text").text == segment["text"]
        start = float(line.find_element("css selector", "button.time").get_attribute("data-start"))
        assert start == pytest.approx(segment["start"], abs=1e-3)
    second = lines[1].find_element("css selector", "button.time")
    second.click()
    start = float(second.get_attribute("data-start"))
    played = page.wait(lambda d: d.execute_script("const p = document.getElementById('player');"
                                                  "return p.currentTime > 0 ? p.currentTime : null"),
                       "the audio moved to the line's time")  # fmt: skip
    assert start - 0.05 <= played < start + 5
    page.driver.execute_script("document.getElementById('player').pause()")
    page.shot("long")
    page.set_number("max-tokens", 3)  # a caption of each segment: the chat answer's labelled lines
    page.press("caption")
    caption = page.finished_turn()
    assert caption.get_attribute("data-state") == "done" and caption.get_attribute("data-layout") == "labels"
    times = [float(b.get_attribute("data-start")) for b in caption.find_elements("css selector", "button.time")]
    assert len(times) >= 2 and times == sorted(times) and times[0] == pytest.approx(0.0, abs=0.5)
    page.find("#new-clip").click()
    assert page.visible("picker") and not page.find_all(".turn") and not page.visible("clip")


def test_a_dropped_file_and_the_lora_slider(page, server, clips):
    from selenium.webdriver.common.keys import Keys

    data = base64.b64encode(clips["short"].read_bytes()).decode()
    page.driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], 'dropped.wav', {type: 'audio/wav'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true}));
    """, data)  # fmt: skip
    page.wait(lambda d: page.visible("controls"), "the dropped clip")
    assert page.find("#clip-name").text == "dropped.wav"
    page.find("#lora").send_keys(Keys.HOME)  # the slider to 0: LoRA off
    assert page.find("#lora-value").text == "0.0"
    page.press("transcribe")
    turn = page.finished_turn()
    off, on = (_transcription(server, clips["short"], num_beams="4", max_new_tokens="12", lora_scale=str(scale))
               .json()["text"] for scale in (0.0, 4.0))  # fmt: skip
    assert turn.find_element("css selector", ".answer").text == off != on
    page.find("#lora-reset").click()
    assert page.find("#lora-value").text == "4.0"


def test_stop_ends_an_answer_and_the_server_stops_its_work(page, server, clips):
    page.upload(clips["short"])
    page.set_number("beams", 1)
    page.set_number("max-tokens", 1500)  # seconds of decoding even for the tiny model
    page.find("#ask-input").send_keys(QUESTION)
    base = server.health()
    page.press("ask")
    page.wait(lambda d: page.find(".turn .answer").text != "", "the answer streaming in")
    assert page.visible("busy") and page.find("button[data-action=ask]").get_attribute("disabled")
    page.find("#stop").click()
    turn = page.finished_turn()
    page.shot("stopped")
    assert turn.get_attribute("data-state") == "error" and turn.find_element("css selector", ".error").text == "stopped"
    assert turn.find_element("css selector", ".answer").text != ""  # what came before the stop stays
    assert not page.visible("busy") and page.find("button[data-action=ask]").is_enabled()
    after = server.wait_health(lambda h: h["cancelled"] == base["cancelled"] + 1, "the stopped answer's work stopped")
    assert after["served"] == base["served"] and not after["busy"]  # stopped, not run to its end


def test_a_file_that_is_not_audio_shows_the_servers_sentence(page, server, clips):
    page.find("#file").send_keys(str(clips["not_audio"]))
    page.wait(lambda d: page.visible("controls"), "the controls")
    page.press("transcribe")
    turn = page.finished_turn()
    page.shot("error")
    assert turn.get_attribute("data-state") == "error"
    expected = _transcription(server, clips["not_audio"])
    assert expected.status_code == 400
    message = expected.json()["error"]["message"]
    assert turn.find_element("css selector", ".error").text == message
    assert message.startswith("could not decode the audio") and "Traceback" not in turn.text


def test_the_microphone_records_a_clip(page, server):
    page.find("#record").click()
    page.wait(lambda d: float(page.find("#record").get_attribute("data-seconds") or 0) >= 2.0, "two recorded seconds")
    page.find("#record").click()
    page.wait(lambda d: page.visible("controls"), "the recorded clip")
    assert page.find("#clip-name").text == "recording.webm"
    page.press("transcribe")
    turn = page.finished_turn()
    page.shot("recorded")
    assert turn.get_attribute("data-state") == "done", turn.text
    assert "the model said nothing" not in turn.text  # the fake microphone's speech was heard and answered


def test_a_phone_sized_window_and_a_story(page, server, clips):
    page.open(PHONE)
    page.upload(clips["short"])
    page.find("#more summary").click()
    width = page.driver.execute_script("return document.documentElement.clientWidth")
    assert page.driver.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scroll
    for control in page.find_all("#controls button, #controls input, #clip button"):
        if control.is_displayed():
            box = control.rect
            assert box["x"] >= 0 and box["x"] + box["width"] <= width, control.get_attribute("outerHTML")
    page.press("story")
    story = page.finished_turn()
    page.shot("phone")
    settings = {a["name"]: a for a in _page_settings(server)["actions"]}["story"]
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clips["short"].read_bytes()).decode(),
                                                    "format": "wav"}}  # fmt: skip
    text = {"type": "text", "text": settings["instruction"]}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [text, audio]}]}
    with _api(server) as api:  # at the story's own LoRA scale, as `salmonn story`
        expected, at_trained = (api.post("/v1/chat/completions", json={**body, "lora_scale": scale}).json()
                                ["choices"][0]["message"]["content"] for scale in (2.0, 4.0))  # fmt: skip
    assert story.find_element("css selector", ".answer").text == expected.strip() != at_trained.strip()
