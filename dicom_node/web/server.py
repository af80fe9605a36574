"""Serve an ASGI app with uvicorn on a thread of the node's process (``dicom-node serve``)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class WebServer:
    """uvicorn on its own thread (its own event loop); :meth:`start` returns once it listens."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.host, self.port = host, port
        # log_config=None: uvicorn's loggers go through the node's logging set-up; no access log (it would
        # repeat every request's URL at INFO), errors still logged with their traceback.
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                                                    access_log=False, lifespan="off", timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> None:
        self._thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"the web server could not listen on {self.host}:{self.port} (web.host, web.port)")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the web server did not stop within %g s", timeout)
        self._thread = None
