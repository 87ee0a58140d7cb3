"""Live servers for the tests: `kataru serve` as a real process, or the app on uvicorn in a thread (where a
test needs to reach into the engine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from kataru.serve.loadgen import free_port

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"


def check_running(process: subprocess.Popen | None) -> None:
    """Fail at once, with what the process wrote, when the process waited for has exited."""
    if process is not None and process.poll() is not None:
        said = process.stderr.read()[-2000:] if process.stderr else "(its output went to a log)"
        raise AssertionError(f"{' '.join(map(str, process.args[:4]))} ... exited with {process.returncode}: {said}")


def wait_healthy(base: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_running(process)
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{base} never became healthy")


def wait_listening(port: int, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_running(process)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listened on 127.0.0.1:{port}")


class Process:
    """`python -m kataru serve ARGS` on a free loopback port, healthy when returned."""

    def __init__(self, *args: str, log: Path | None = None) -> None:
        """log: a file for the server's output (a long run's access log would fill a pipe nobody reads, and the
        server would block writing to it)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        out = open(log, "w") if log is not None else subprocess.PIPE
        self.process = subprocess.Popen([sys.executable, "-m", "kataru", "serve", *args, "--port", str(self.port)],
                                        cwd=ROOT, stdout=out, stderr=out, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if log is not None:
            out.close()
        try:
            wait_healthy(self.base, process=self.process)
        except BaseException:
            self.stop()
            raise

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class Threaded:
    """The app on uvicorn in a thread of this process: `server` is the app's Server (its model, its engine)."""

    def __init__(self, load: Callable[[], Any], **settings: Any) -> None:
        import uvicorn

        from kataru.serve.app import Settings, create_app

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.app = create_app(load, Settings(**{"served_model_name": "m", **settings}))
        self.server = self.app.state.server
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                     access_log=False))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        wait_healthy(self.base)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)
