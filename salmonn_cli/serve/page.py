"""The web page at `/`: one static page (HTML, CSS and plain JavaScript, package data in `web/`) over the server's
own OpenAI-compatible API, and the few facts it needs from the server, at `/ui/config.json`.

The page is the API's client like any other: it uploads to /v1/audio/transcriptions and /translations, asks
through /v1/chat/completions, and shows the one sentence of any error the API returns. What it cannot know by
itself comes from here, each from its one owner: the served name, whether a key is needed, the decoding defaults,
and each button's task as the CLI runs it (instruction and LoRA scale). The page and its config are open (a
browser cannot send a key with a page load); the API behind them keeps its key. The Content-Security-Policy lets
the page load nothing but its own files, so it works offline and nothing can be injected from elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from ..window import WINDOW_SECONDS
from .config import ServeConfig

ASSETS = {  # path -> (file in web/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
}
CONFIG_PATH = "/ui/config.json"
PAGE_PATHS = frozenset({*ASSETS, CONFIG_PATH})  # never behind the key (the Guard's open paths)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new version of the package is seen at the next load
}
LORA_SLIDER_TOP = 2.0  # the slider runs from 0 to this many times the trained scale


@dataclass(frozen=True)
class PageAction:
    """One of the page's buttons: the API it calls ("transcription", "translation" or "chat"), the instruction a
    chat sends (None: the user types it), the LoRA scale the CLI's command would use, and what it asks the user
    for first ("language", "question" or nothing)."""

    name: str
    label: str
    api: str
    lora_scale: float
    instruction: str | None = None
    asks: str | None = None


def page_actions(config: ServeConfig, trained_lora_scale: float) -> tuple[PageAction, ...]:
    from ..cli.runner import Task
    from ..cli.tasks import caption_task, story_task

    def scale(task: Task) -> float:
        chosen = config.decode.scale_for(task.lora_scale)  # the server's --lora-scale, else the task's own
        return trained_lora_scale if chosen is None else chosen

    caption, story, plain = caption_task(), story_task(), Task("ask", "")
    return (
        PageAction("transcribe", "Transcribe", "transcription", scale(plain)),
        PageAction("translate", "Translate", "translation", scale(plain), asks="language"),
        PageAction("caption", "Caption", "chat", scale(caption), instruction=caption.instruction),
        PageAction("story", "Story", "chat", scale(story), instruction=story.instruction),
        PageAction("ask", "Ask", "chat", scale(plain), asks="question"),
    )


def page_config(config: ServeConfig, trained_lora_scale: float) -> dict[str, Any]:
    """What `/ui/config.json` says."""
    options = config.decode.options
    return {
        "model": config.served_name,
        "needs_key": config.api_key is not None,
        "window_seconds": WINDOW_SECONDS,  # longer clips are answered segment by segment, one timed line each
        "defaults": {"num_beams": options.num_beams, "max_tokens": options.max_new_tokens},
        "lora": {"trained": trained_lora_scale, "max": LORA_SLIDER_TOP * trained_lora_scale},
        "actions": [asdict(action) for action in page_actions(config, trained_lora_scale)],
    }


def read_assets() -> dict[str, tuple[bytes, str]]:
    """Each page path's bytes and media type, read once from the package."""
    folder = resources.files(__package__) / "web"
    return {path: ((folder / name).read_bytes(), media) for path, (name, media) in ASSETS.items()}


def add_page_routes(app, config: ServeConfig, trained_lora_scale: float) -> None:
    from fastapi.responses import JSONResponse, Response

    settings = page_config(config, trained_lora_scale)

    def serving(body: bytes, media: str):
        async def asset() -> Response:
            return Response(body, media_type=media, headers=PAGE_HEADERS)

        return asset

    for path, (body, media) in read_assets().items():
        app.add_api_route(path, serving(body, media), methods=["GET"], include_in_schema=False)

    @app.get(CONFIG_PATH, include_in_schema=False)
    async def page_settings() -> Response:
        return JSONResponse(settings, headers={"Cache-Control": "no-store"})
