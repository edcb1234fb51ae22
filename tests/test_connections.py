"""relay/connections.py with ``redis.sentinel``: Celery's broker URL, sentinels that are
down, and ``relay up``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import pytest
from kombu import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.config import RedisSettings, SentinelSettings, parse_config
from relay.connections import async_client, celery_broker, describe, sync_client
from relay.ops.up import run_up
from tests.support import free_port


def sentinel_settings(url: str, hosts: list[str] | None = None) -> RedisSettings:
    return RedisSettings(url=url, sentinel=SentinelSettings(
        hosts=hosts or ["127.0.0.1:26379", "127.0.0.1:26380", "127.0.0.1:26381"],
        master="mymaster"))


@pytest.mark.parametrize("url, password", [
    ("redis://:plain-pass_1@/0", "plain-pass_1"),
    # Left as is in redis.url (redis-py reads it so): kombu splits the broker URL at ';'.
    ("redis://:abc;def@/0", "abc;def"),
    # Quoted in redis.url: stays quoted, and both sides get the same password.
    ("redis://:p%40ss%3Aw%2Frd%3Bx@/0", "p@ss:w/rd;x"),
])
def test_the_broker_url_names_every_sentinel_with_the_password_kombu_reads_back(
        url: str, password: str) -> None:
    broker, options = celery_broker(sentinel_settings(url))
    assert options["master_name"] == "mymaster"
    conn = Connection(broker, transport_options=options)
    assert len(conn.alt) == 3
    for alt in conn.alt:
        each = Connection(alt)
        assert each.transport_cls == "sentinel"
        assert each.hostname == "127.0.0.1" and each.port in (26379, 26380, 26381)
        assert each.password == password
        assert each.virtual_host == "0"


def test_the_sentinels_own_password_goes_to_the_sentinels_only() -> None:
    settings = RedisSettings(url="redis://:data@/2", sentinel=SentinelSettings(
        hosts=["10.0.0.1:26379"], master="m", password="sentinel-secret"))
    broker, options = celery_broker(settings)
    assert broker == "sentinel://:data@10.0.0.1:26379/2"
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
    assert "secret" not in describe(settings) and "data" not in describe(settings)


def test_a_sentinel_that_is_down_is_passed_over_at_once_by_every_client() -> None:
    # Nothing listens on these ports: each refuses at once. redis-py retried each sentinel 3
    # times with backoff before asking the next: 12.6 s for three (24 s through kombu) before
    # MasterNotFoundError; with one of three down, 4 s added to every discovery that asked it
    # first.
    settings = sentinel_settings("redis://:pw@/0", [f"127.0.0.1:{free_port()}" for _ in range(3)])

    def timed(call) -> float:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match="No master found"):
            call()
        return time.monotonic() - started

    with sync_client(settings, socket_connect_timeout=2, socket_timeout=5) as client:
        assert timed(client.ping) < 1.5

    async def ping() -> None:
        client = async_client(settings, socket_connect_timeout=2, max_connections=4)
        try:
            await client.ping()
        finally:
            await client.aclose()

    assert timed(lambda: asyncio.run(ping())) < 1.5
    broker, options = celery_broker(settings)
    conn = Connection(broker, transport_options=options)
    try:
        assert timed(lambda: conn.channel().client.ping()) < 1.5
    finally:
        with contextlib.suppress(Exception):  # kombu's close after a failed connect
            conn.release()


def test_relay_up_does_not_start_a_redis_of_its_own_when_the_sentinels_do_not_answer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(3)]  # nothing listens there
    config = parse_config(
        "redis:\n"
        f"  sentinel: {{hosts: [{', '.join(hosts)}], master: mymaster}}\n"
        "  url: redis://:pw@/0\n"
        "ingress: {secrets: [s]}\n", "relay.yaml", {})
    with caplog.at_level(logging.ERROR, logger="relay.up"):
        code = run_up(config, host=None, port=None, with_sink=False, var_dir=tmp_path / "var")
    assert code == 2
    assert not (tmp_path / "var").exists()  # no redis-server was started
    assert "Sentinel set is not usable" in caplog.text
