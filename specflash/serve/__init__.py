"""`specflash serve`: an OpenAI-compatible HTTP server over speculative decoding.

    from specflash.serve import ServeSettings, create_app, ServerThread
    app = create_app(Pipeline.load("smollm2-135m-instruct"), ServeSettings("smollm2-135m-instruct"))
    with ServerThread(app) as server:   # 127.0.0.1, a free port
        print(server.url)

Layout: `protocol` (OpenAI request schemas, checks, error bodies), `engine` (one
decoding thread, FIFO queue, round-robin slots, stop strings), `stats` (the /metrics
series, on prometheus_client), `app` (FastAPI routes), `runner` (uvicorn). Needs the `serve`
extra: pip install 'specflash[serve]'.
"""

from .app import ServeSettings, create_app
from .engine import Engine, Job, TextAssembler
from .runner import ServerThread, serve_forever

__all__ = ["Engine", "Job", "ServeSettings", "ServerThread", "TextAssembler", "create_app", "serve_forever"]
