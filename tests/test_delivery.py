"""Delivery end to end: ingress -> Redis -> real Celery worker -> real HTTP sinks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.signatures import IngramSigner, StandardWebhook
from tests.hub import STANDARD_SECRET, Sink, event_body, ingress, post, worker, write_config


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


def test_each_subscriber_receives_exact_bytes_signed_with_its_own_secret(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "erp secret: with # odd ]chars",
         "signature": "ingram"},
        {"name": "wms", "url": sink.url("/wms"), "secret": STANDARD_SECRET,
         "signature": "standard"},
        {"name": "crm", "url": sink.url("/crm"), "secret": STANDARD_SECRET,
         "signature": "both", "headers": {"Authorization": "Bearer t0k"}},
    ])
    body = event_body("EVSIGNED0001")
    with worker(config, tmp_path / "worker.log"), ingress(config, tmp_path / "ingress.log") as url:
        assert post(url, body)[0] == 202
        erp = sink.wait_for("/erp", 1)[0]
        wms = sink.wait_for("/wms", 1)[0]
        crm = sink.wait_for("/crm", 1)[0]
    for got in (erp, wms, crm):
        assert got.body == body
        assert got.headers["Content-Type"] == "application/json"
    IngramSigner(["erp secret: with # odd ]chars"]).verify("EVSIGNED0001",
                                                          erp.headers["X-Hub-Signature"])
    assert "webhook-signature" not in {k.lower() for k in erp.headers}
    StandardWebhook(STANDARD_SECRET).verify(wms.body, wms.headers)
    assert wms.headers["webhook-id"] == "msg_EVSIGNED0001"
    assert "X-Hub-Signature" not in wms.headers
    StandardWebhook(STANDARD_SECRET).verify(crm.body, crm.headers)
    IngramSigner([STANDARD_SECRET]).verify("EVSIGNED0001", crm.headers["X-Hub-Signature"])
    assert crm.headers["Authorization"] == "Bearer t0k"
