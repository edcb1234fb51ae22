"""Signed, valid, distinct events as Ingram Micro sends them: an order-shipped (~870 bytes),
and a stock update of up to 4,000 SKUs (~1.7 MB)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from relay.signatures import sign_ingram

INGRESS_SECRET = "bench-ingress-secret"
EVENT_TYPE = "im::order_shipped"

# Shaped like tests/shared/samples/order_shipped.json, so envelope validation does real work.
_TEMPLATE = {
    "topic": "resellers/orders",
    "event": "im::updated",
    "eventTimeStamp": "2021-11-01T13:02:06.369Z",
    "eventId": "",
    "resource": [{
        "eventType": EVENT_TYPE,
        "orderNumber": "20-RD128",
        "customerOrderNumber": "ZENPO",
        "orderEntryTimeStamp": "2020-04-03T08:54:39-07:00",
        "lines": [{
            "ingramLineNumber": "001", "subOrderNumber": "20-RD128-21",
            "lineStatus": "IM::shipped", "ingramPartNumber": "5CX895",
            "vendorPartNumber": "TC57HO-1PEZU4P-NA", "requestedQuantity": 3,
            "shippedQuantity": 2, "backOrderedQuantity": 1,
            "shipmentDetails": [{
                "shipmentDate": "2019-11-06", "shipFromWarehouseId": "10",
                "warehouseName": "New York", "carrierCode": "4M",
                "carrierName": "SMARTPOST-BM",
                "packageDetails": [{"cartonNumber": "", "quantityInbox": "",
                                    "trackingNumber": ""}],
            }],
            "serialNumberDetails": [{"serialNumber": "123123123"}],
        }],
        "links": [{"topic": "orders", "href": "/resellers/v5/orders/20-RD128", "type": "GET"}],
    }],
}

_MARK = b'"eventId":""'
_HEAD, _TAIL = msgspec.json.encode(_TEMPLATE).split(_MARK)


def event_id(prefix: str, n: int) -> str:
    return f"{prefix}{n:09d}"


def event_body(eid: str) -> bytes:
    return _HEAD + b'"eventId":"' + eid.encode() + b'"' + _TAIL


def signed(eid: str, secret: str = INGRESS_SECRET) -> tuple[bytes, str]:
    """The body and its ``X-Hub-Signature``."""
    return event_body(eid), sign_ingram(secret, eid)


class _IdOnly(msgspec.Struct):
    eventId: str


_id_decoder = msgspec.json.Decoder(_IdOnly)


def id_of(body: bytes) -> str:
    return _id_decoder.decode(body).eventId


_STOCK_SAMPLE = (Path(__file__).resolve().parent.parent / "tests" / "shared" / "samples"
                 / "stock_update.json")


def stock_update(eid: str, skus: int = 4000, indent: int | None = 2) -> bytes:
    """A stock update as Ingram splits them: ``skus`` resource items (4,000 per event at
    most), each the sample's item with its own part numbers. 4,000 SKUs: ~1.13 MB compact,
    ~1.7 MB indented by 2 (``indent=None`` for compact)."""
    doc = json.loads(_STOCK_SAMPLE.read_text())
    item = doc["resource"][0]
    doc["eventId"] = eid
    doc["resource"] = [
        {**item, "ingramPartNumber": f"{n:06d}", "vendorPartNumber": f"VP-{n:08d}-NA",
         "totalAvailability": str(n % 500),
         "links": [{**item["links"][0], "href": f"/resellers/v6/catalog/details/{n:06d}"}]}
        for n in range(skus)]
    text = json.dumps(doc, indent=indent) if indent else json.dumps(doc, separators=(",", ":"))
    return text.encode()
