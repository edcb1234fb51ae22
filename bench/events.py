"""Signed, valid, distinct events as Ingram Micro sends them (an order-shipped, ~870 bytes)."""

from __future__ import annotations

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
