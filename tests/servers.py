"""What some tests need from the machine and do not start themselves: a PostgreSQL server, a browser.

Where one is missing the test skips and says why; under CI (``CI=true``) it fails instead, so that a CI
machine without it never passes by skipping.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest

from sounding_anagrams.errors import one_line

POSTGRES = os.environ.get("SOUNDING_ANAGRAMS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def missing(reason: str) -> NoReturn:
    """Skip the running test for ``reason``, or fail it under CI, which must provide what it needs."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a CI machine must have it)")
    pytest.skip(reason)


def postgres_url() -> str:
    """The test PostgreSQL server's URL (``$SOUNDING_ANAGRAMS_TEST_POSTGRES``), once a connection to it
    succeeds; else :func:`missing`."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(POSTGRES)
    try:
        engine.connect().close()
    except Exception as error:  # refused, unknown host, bad password, no driver: all mean "no server here"
        missing(f"no PostgreSQL at {POSTGRES}: {one_line(error)}")
    finally:
        engine.dispose()
    return POSTGRES


@contextlib.contextmanager
def fresh_databases(*names: str) -> Iterator[list[str]]:
    """URLs of databases of their own on the PostgreSQL server, not created yet (skip without a server,
    except under CI); dropped after."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(postgres_url()).set(drivername="postgresql+psycopg")
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    suffix = uuid.uuid4().hex[:10]
    databases = [f"sa_{name}_{suffix}" for name in names]  # made by the server and the first worker
    try:
        yield [base.set(database=d).render_as_string(hide_password=False) for d in databases]
    finally:
        with engine.connect() as connection:
            for database in databases:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        engine.dispose()


class CuttableProxy:
    """A loopback TCP proxy to ``upstream``; :meth:`cut` closes every connection through it and refuses new
    ones: a server lost under a running client, as the client sees it (a reset, then refused connections),
    without touching the server that other tests share."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._cut.is_set():
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return  # the listener was closed by cut()
            with self._lock:
                if self._cut.is_set():
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)  # the other side sees the end too

    def cut(self) -> None:
        self._cut.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (close alone does not)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
