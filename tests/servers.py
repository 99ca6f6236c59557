"""What some tests need from the machine and do not start themselves: a PostgreSQL server, a browser.

Where one is missing the test skips and says why; under CI (``CI=true``) it fails instead, so that a CI
machine without it never passes by skipping.
"""

from __future__ import annotations

import os
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
