"""Running the app on uvicorn: in the foreground (`specflash serve`) or on a background
thread bound to a loopback port (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 = any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _config(app, log_level: str):
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5)


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  on_ready=None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(_config(app, log_level))
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    server.run(sockets=[sock])


class ServerThread:
    """Run `app` on 127.0.0.1 on a background thread:

        with ServerThread(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 startup_timeout: float = 60.0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(_config(app, log_level))
        self.startup_timeout = startup_timeout
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="specflash-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        self._thread.start()
        for _ in range(int(self.startup_timeout / 0.02)):
            if self.server.started or not self._thread.is_alive():
                break
            self._thread.join(0.02)
        if not self.server.started:
            self.stop()
            raise RuntimeError("the server did not start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
