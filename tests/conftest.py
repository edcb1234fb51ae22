"""Session fixtures: one private redis-server for the whole run (never the shared 6379)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis

from tests.hub import Sink
from tests.support import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on a flushed database; restarts the server first if a test left it down."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A recording HTTP sink on 127.0.0.1 (tests/hub.py), stopped after the test."""
    s = Sink().start()
    yield s
    s.stop()
