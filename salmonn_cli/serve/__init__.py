"""`salmonn serve`: the model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn, the `serve` extra).

- `config`: the server's settings, one frozen dataclass.
- `api_error`: every error a client sees, in OpenAI's shape.
- `guard`: the ASGI layer in front of the routes (request ids, Host check, API key, body size).
- `intake`: uploaded or base64 bytes -> a waveform, sniffed by content and capped in length.
- `params`: form fields and chat JSON -> checked, typed requests.
- `formats`: results -> OpenAI's response bodies and stream events.
- `inference`: what the model does for each request (the CLI's own code paths).
- `worker`: the one inference thread, its bounded queue and cancellation.
- `jobs`: a request's work on the worker, waited for or streamed, while the client is watched.
- `app`: the routes.
"""
