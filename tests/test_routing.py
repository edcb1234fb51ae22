"""Routing: which subscribers an event goes to (``topics`` and ``event_types`` filters)."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from relay.config import Backoff, Duration, Subscriber
from relay.models import StoredEvent, parse_envelope
from tests.hub import Sink, dead_letters, event_body, ingress, post, worker, write_config
from tests.support import SAMPLES


def sub(name: str, topics: tuple[str, ...] = (), event_types: tuple[str, ...] = ()
        ) -> Subscriber:
    return Subscriber(name=name, url=f"http://127.0.0.1:1/{name}", secret="s",
                      signature="ingram", topics=topics, event_types=event_types, headers={},
                      timeout=1.0, max_attempts=3,
                      backoff=Backoff(initial=Duration(1), max=Duration(2)))


def stored(body: bytes) -> StoredEvent:
    """The record the ingress stores for ``body`` (same construction as the ingress)."""
    env = parse_envelope(body)
    return StoredEvent(event_id=env.eventId, topic=env.topic, event_types=env.event_types(),
                       received_at=time.time(), body=body)


def envelope(topic: str = "resellers/orders", top: str | None = None,
             items: list[str | None] | None = None, single: bool = False) -> StoredEvent:
    resource: object = [{"eventType": t} if t else {} for t in (items or [])]
    if single:
        resource = resource[0] if resource else {}  # type: ignore[index]
    doc: dict[str, object] = {"topic": topic, "event": "im::updated", "eventId": "EVROUTE1",
                              "eventTimeStamp": "2024-01-01T00:00:00Z", "resource": resource}
    if top is not None:
        doc["eventType"] = top
    return stored(msgspec.json.encode(doc))


def names(router_subs: list[Subscriber], event: StoredEvent) -> list[str]:
    from relay.routing import Router

    return [s.name for s in Router(router_subs).route(event)]


def test_subscriber_without_filters_receives_every_event() -> None:
    assert names([sub("all")], envelope(topic="resellers/catalog", items=["im::stock_update"])) \
        == ["all"]
    assert names([sub("all")], envelope(items=[])) == ["all"]


def test_topic_filter_matches_case_insensitively_and_rejects_other_topics() -> None:
    subs = [sub("orders", topics=("Resellers/ORDERS",))]
    assert names(subs, envelope(topic="resellers/orders", items=["im::order_shipped"])) \
        == ["orders"]
    assert names(subs, envelope(topic="RESELLERS/orders", items=["im::order_shipped"])) \
        == ["orders"]
    assert names(subs, envelope(topic="resellers/catalog", items=["im::stock_update"])) == []
    # Whole-string match, not a prefix or substring.
    assert names(subs, envelope(topic="resellers/orders/extra", items=[])) == []
    assert names(subs, envelope(topic="x/resellers/orders", items=[])) == []


def test_topic_filter_star_wildcard_matches_any_run_of_characters() -> None:
    subs = [sub("resellers", topics=("resellers/*",)), sub("quotes", topics=("*/quotes",))]
    assert names(subs, envelope(topic="resellers/quotes")) == ["resellers", "quotes"]
    assert names(subs, envelope(topic="resellers/catalog")) == ["resellers"]
    assert names(subs, envelope(topic="partners/catalog")) == []


def test_event_type_filter_is_case_insensitive_in_both_pattern_and_event() -> None:
    subs = [sub("ship", event_types=("IM::Order_Shipped",))]
    assert names(subs, envelope(items=["im::order_shipped"])) == ["ship"]
    assert names(subs, envelope(items=["IM::ORDER_SHIPPED"])) == ["ship"]
    assert names(subs, envelope(items=["im::order_invoiced"])) == []


def test_event_type_star_wildcard_matches_any_run_and_nothing_else_is_special() -> None:
    subs = [sub("orders", event_types=("im::order_*",)), sub("any", event_types=("*",)),
            sub("mid", event_types=("im::*_update",))]
    assert names(subs, envelope(items=["im::order_hold"])) == ["orders", "any"]
    assert names(subs, envelope(topic="resellers/catalog", items=["IM::STOCK_UPDATE"])) \
        == ["any", "mid"]
    # A wildcard is the only special character: regex metacharacters are literal.
    dotted = [sub("dot", event_types=("im.order.*",))]
    assert names(dotted, envelope(items=["imxorderxshipped"])) == []
    assert names(dotted, envelope(items=["im.order.shipped"])) == ["dot"]


def test_event_type_filter_sees_top_level_event_type() -> None:
    subs = [sub("quotes", event_types=("im::quote_create",))]
    quote = stored((SAMPLES / "quote_create.json").read_bytes().strip())
    assert quote.event_types == ("im::quote_create",)
    assert names(subs, quote) == ["quotes"]
    assert names(subs, envelope(top="IM::QUOTE_CREATE", single=True)) == ["quotes"]


def test_event_type_filter_matches_any_resource_item_event_type() -> None:
    subs = [sub("hold", event_types=("im::order_hold",))]
    assert names(subs, envelope(items=["im::order_shipped", None, "IM::Order_Hold"])) \
        == ["hold"]
    assert names(subs, envelope(items=["im::order_shipped", "im::order_invoiced"])) == []
    # A single-object resource (quote / async order create shape) is looked into too.
    assert names(subs, envelope(items=["im::order_hold"], single=True)) == ["hold"]


def test_event_without_any_event_type_does_not_match_an_event_type_filter() -> None:
    subs = [sub("typed", event_types=("*",)), sub("untyped")]
    assert names(subs, envelope(items=[None])) == ["untyped"]


def test_all_given_filters_must_match() -> None:
    subs = [sub("both", topics=("resellers/orders",), event_types=("im::order_shipped",))]
    assert names(subs, envelope(topic="resellers/orders", items=["im::order_shipped"])) \
        == ["both"]
    # Topic matches, type does not.
    assert names(subs, envelope(topic="resellers/orders", items=["im::order_voided"])) == []
    # Type matches, topic does not.
    assert names(subs, envelope(topic="resellers/catalog", items=["im::order_shipped"])) == []


def test_any_pattern_of_a_filter_list_may_match() -> None:
    subs = [sub("erp", topics=("resellers/orders", "resellers/quotes"),
                event_types=("im::order_shipped", "im::order_invoiced", "im::quote_*"))]
    assert names(subs, envelope(items=["im::order_invoiced"])) == ["erp"]
    assert names(subs, envelope(topic="resellers/quotes", top="im::quote_create",
                                single=True)) == ["erp"]
    assert names(subs, envelope(items=["im::order_hold"])) == []


def test_routing_keeps_config_order_of_subscribers() -> None:
    subs = [sub(f"s{i}") for i in range(5)]
    assert names(subs, envelope(items=["im::order_shipped"])) == [f"s{i}" for i in range(5)]


def test_shared_samples_route_to_the_subscribers_whose_filters_they_match() -> None:
    subs = [sub("orders", topics=("resellers/orders",)),
            sub("stock", event_types=("im::stock_update",)),
            sub("quotes", topics=("resellers/quotes",), event_types=("im::quote_create",)),
            sub("shipped", event_types=("im::order_shipped",))]
    expected = {
        "order_shipped.json": ["orders", "shipped"],
        "stock_update.json": ["stock"],
        "quote_create.json": ["quotes"],
    }
    for file, want in expected.items():
        assert names(subs, stored((SAMPLES / file).read_bytes().strip())) == want, file



def test_non_matching_subscriber_receives_nothing_end_to_end(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "stock", "url": sink.url("/stock"), "secret": "s1",
         "topics": ["resellers/catalog"]},
        {"name": "shipped", "url": sink.url("/shipped"), "secret": "s2",
         "event_types": ["IM::ORDER_SHIPPED"]},
        {"name": "voided", "url": sink.url("/voided"), "secret": "s3",
         "topics": ["resellers/orders"], "event_types": ["im::order_voided"]},
        {"name": "all", "url": sink.url("/all"), "secret": "s4"},
    ])
    with worker(config, tmp_path / "worker.log"), ingress(config, tmp_path / "ingress.log") as url:
        assert post(url, event_body("EVROUTE-SHIP", "im::order_shipped"))[0] == 202
        assert post(url, event_body("EVROUTE-HOLD", "im::order_hold"))[0] == 202
        # Both events reach the unfiltered subscriber; only the shipped one the typed one.
        everything = sink.wait_for("/all", 2)
        shipped = sink.wait_for("/shipped", 1)
        # Every fan-out has been decided once both events are done for "all"; the others
        # would have been started in the same task. Give stragglers a moment anyway.
        time.sleep(0.5)
    assert sorted(r.event_id for r in everything) == ["EVROUTE-HOLD", "EVROUTE-SHIP"]
    assert [r.event_id for r in shipped] == ["EVROUTE-SHIP"]
    assert sink.on("/stock") == []
    assert sink.on("/voided") == []
    # Nothing is pending for the non-matching subscribers either.
    assert redis_client.zcard("relay:schedule") == 0
    assert dead_letters(redis_client) == {}
