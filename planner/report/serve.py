"""`planner dashboard RUN...`: the dashboard served on 127.0.0.1, refreshed while a search runs.

GET / returns the page with the data of the moment and a polling hook; GET /data.json returns
fresh data, rebuilt only when a file of a run dir changed (size or mtime), so an idle page costs
a few stat calls per poll. Standard library only; the server never writes to a run dir.
"""

from __future__ import annotations

import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from planner.report.dashboard import dashboard_data, data_json, render
from planner.report.tables import load_runs

_WATCHED = ("results.jsonl", "heldout.jsonl", "best_plan.json", "sensitivity.json", "problem.json")


class DashboardData:
    """The dashboard data of some run dirs, rebuilt when one of their files changes."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self._key, self._data, self._lock = None, None, threading.Lock()

    def _stamp(self) -> tuple:
        out = []
        for p in self.paths:
            for name in _WATCHED:
                f = p / name
                st = f.stat() if f.is_file() else None
                out.append((str(f), st and st.st_size, st and st.st_mtime_ns))
        return tuple(out)

    def get(self) -> dict:
        with self._lock:
            key = self._stamp()
            if key != self._key:
                self._data, self._key = dashboard_data(load_runs(self.paths)), key
            return self._data


def make_server(paths, port: int = 8765, refresh: float = 5.0) -> ThreadingHTTPServer:
    """A server bound to 127.0.0.1:`port` (0: any free port); `serve_forever()` runs it."""
    data = DashboardData(paths)
    data.get()                      # bad run dirs fail here, before anything listens

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            route = self.path.split("?", 1)[0]
            if route == "/":
                self._send(render(data.get(), live={"url": "/data.json", "every": refresh}), "text/html")
            elif route == "/data.json":
                self._send(data_json(data.get()), "application/json")
            elif route == "/favicon.ico":
                self.send_response(HTTPStatus.NO_CONTENT)
                self.end_headers()
            else:
                self.send_error(HTTPStatus.NOT_FOUND)

        def _send(self, text: str, kind: str) -> None:
            body = text.encode("utf-8")
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:     # one line per poll would drown the terminal
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)
