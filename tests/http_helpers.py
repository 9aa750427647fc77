"""Talking to the OpenAI-compatible server in tests: a server on a free port for the length
of a `with` block, and one request (status, body text) that never raises on HTTP errors."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from serve.http import Server, make_server


@contextmanager
def serving(session, **kw) -> Iterator[Server]:
    """A server of session on 127.0.0.1 (any free port; srv.url), stopped at the end."""
    srv = make_server(session, "127.0.0.1", 0, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def request(url, body=None, raw=None) -> tuple[int, str]:
    """POST body as JSON (or raw bytes; GET with neither) -> (status, body text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
