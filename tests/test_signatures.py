"""Signatures: every shared vector, rotation, and refusal of wrong or missing signatures."""

from __future__ import annotations

import base64
import json

import pytest

from relay.errors import SignatureError
from relay.signatures import IngramSigner, StandardWebhook, sign_ingram
from tests.support import SHARED

VECTORS = json.loads((SHARED / "signature_vectors.json").read_text())
INGRAM = VECTORS["ingram_x_hub_signature"]
STANDARD = VECTORS["standard_webhooks_v1"]


def vector_id(v: dict[str, str]) -> str:
    return f"{v['secret']}/{v.get('eventId') or v.get('webhook-id')}"


def body_of(vector: dict[str, str]) -> bytes:
    """The sample named by ``body_file``, without its trailing newline."""
    name = vector["body_file"].split()[0]
    return (SHARED / name).read_bytes().rstrip(b"\r\n")


def test_vector_file_has_vectors_of_both_kinds():
    assert len(INGRAM) >= 4 and len(STANDARD) >= 1


# --- Ingram X-Hub-Signature ---------------------------------------------------------------


@pytest.mark.parametrize("vector", INGRAM, ids=vector_id)
def test_ingram_vector_signs_to_expected_signature(vector):
    assert sign_ingram(vector["secret"], vector["eventId"]) == vector["signature"]
    assert IngramSigner([vector["secret"]]).sign(vector["eventId"]) == vector["signature"]


@pytest.mark.parametrize("vector", INGRAM, ids=vector_id)
def test_ingram_vector_verifies(vector):
    IngramSigner([vector["secret"]]).verify(vector["eventId"], vector["signature"])


@pytest.mark.parametrize("vector", INGRAM, ids=vector_id)
def test_ingram_vector_signature_is_padded_standard_base64_of_sha512(vector):
    raw = base64.b64decode(vector["signature"], validate=True)
    assert len(raw) == 64
    assert vector["signature"].endswith("==")


@pytest.mark.parametrize("vector", INGRAM, ids=vector_id)
def test_ingram_vector_does_not_verify_for_another_event_id(vector):
    with pytest.raises(SignatureError):
        IngramSigner([vector["secret"]]).verify(vector["eventId"] + "X", vector["signature"])


def test_ingram_signature_survives_surrounding_whitespace():
    v = INGRAM[0]
    IngramSigner([v["secret"]]).verify(v["eventId"], f"  {v['signature']} ")


@pytest.mark.parametrize("position", [0, 1])
def test_rotation_any_configured_secret_verifies(position):
    by_secret = {v["secret"]: v for v in INGRAM if v["eventId"] == "N01CIB9VVFYKR9J6ZW"}
    old, new = sorted(by_secret)
    secrets = [old, new] if position == 0 else [new, old]
    signer = IngramSigner(["third-unrelated", *secrets])
    for v in by_secret.values():
        signer.verify(v["eventId"], v["signature"])


def test_rotation_signs_with_the_first_secret():
    signer = IngramSigner(["first", "second"])
    assert signer.sign("E1") == sign_ingram("first", "E1")
    assert signer.sign("E1") != sign_ingram("second", "E1")


def test_signature_from_unconfigured_secret_is_refused():
    signer = IngramSigner(["current", "previous"])
    with pytest.raises(SignatureError, match="does not match"):
        signer.verify("E1", sign_ingram("retired", "E1"))


@pytest.mark.parametrize("signature", [None, ""])
def test_missing_ingram_signature_is_refused(signature):
    with pytest.raises(SignatureError, match="missing"):
        IngramSigner(["s3cret"]).verify("N01CIB9VVFYKR9J6ZW", signature)


@pytest.mark.parametrize("signature", [
    "garbage", "é-not-ascii", "W1td9M7K6CaNsDjlYuOg4HZNztGnrqMEUcWjjhqU9pY=",
    INGRAM[0]["signature"].rstrip("="),  # unpadded
    INGRAM[0]["signature"].lower(),
])
def test_wrong_ingram_signature_is_refused(signature):
    with pytest.raises(SignatureError):
        IngramSigner([INGRAM[0]["secret"]]).verify(INGRAM[0]["eventId"], signature)


def test_ingram_secret_is_used_as_written_utf8():
    secret = "whsec_c2VjcmV0LWxvb2tpbmc= ünï:#]"
    signature = sign_ingram(secret, "E1")
    IngramSigner([secret]).verify("E1", signature)
    with pytest.raises(SignatureError):
        IngramSigner([secret.strip()[:-1]]).verify("E1", signature)


def test_signer_needs_a_secret():
    with pytest.raises(ValueError):
        IngramSigner([])


# --- Standard Webhooks v1 -----------------------------------------------------------------


@pytest.mark.parametrize("vector", STANDARD, ids=vector_id)
def test_standard_vector_signs_sample_body_to_expected_signature(vector):
    wh = StandardWebhook(vector["secret"])
    ts = int(vector["webhook-timestamp"])
    assert wh.sign(vector["webhook-id"], ts, body_of(vector)) == vector["webhook-signature"]
    headers = wh.headers(vector["webhook-id"], body_of(vector), timestamp=ts)
    assert headers == {"webhook-id": vector["webhook-id"],
                       "webhook-timestamp": vector["webhook-timestamp"],
                       "webhook-signature": vector["webhook-signature"]}


@pytest.mark.parametrize("vector", STANDARD, ids=vector_id)
def test_standard_vector_verifies(vector):
    headers = {k: vector[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    StandardWebhook(vector["secret"]).verify(body_of(vector), headers,
                                             now=int(vector["webhook-timestamp"]) + 10)


@pytest.mark.parametrize("vector", STANDARD, ids=vector_id)
def test_standard_verify_accepts_one_of_several_signatures(vector):
    headers = {"Webhook-Id": vector["webhook-id"],
               "Webhook-Timestamp": vector["webhook-timestamp"],
               "Webhook-Signature": "v1,bm90LWl0 " + vector["webhook-signature"]}
    StandardWebhook(vector["secret"]).verify(body_of(vector), headers,
                                             now=int(vector["webhook-timestamp"]))


@pytest.mark.parametrize("vector", STANDARD, ids=vector_id)
def test_standard_vector_does_not_verify_body_with_trailing_newline(vector):
    headers = {k: vector[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    with pytest.raises(SignatureError, match="does not match"):
        StandardWebhook(vector["secret"]).verify(body_of(vector) + b"\n", headers,
                                                 now=int(vector["webhook-timestamp"]))


@pytest.mark.parametrize("vector", STANDARD, ids=vector_id)
def test_standard_signature_with_stale_timestamp_is_refused(vector):
    headers = {k: vector[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    with pytest.raises(SignatureError, match="tolerance"):
        StandardWebhook(vector["secret"]).verify(body_of(vector), headers,
                                                 now=int(vector["webhook-timestamp"]) + 3600)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_standard_missing_header_is_refused(missing):
    v = STANDARD[0]
    headers = {k: v[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")
               if k != missing}
    with pytest.raises(SignatureError, match="missing"):
        StandardWebhook(v["secret"]).verify(body_of(v), headers,
                                            now=int(v["webhook-timestamp"]))


@pytest.mark.parametrize("signature", ["v1,AAAA", "v2," + STANDARD[0]["webhook-signature"][3:],
                                       STANDARD[0]["webhook-signature"][3:], ""])
def test_standard_wrong_signature_is_refused(signature):
    v = STANDARD[0]
    headers = {"webhook-id": v["webhook-id"], "webhook-timestamp": v["webhook-timestamp"],
               "webhook-signature": signature}
    with pytest.raises(SignatureError):
        StandardWebhook(v["secret"]).verify(body_of(v), headers,
                                            now=int(v["webhook-timestamp"]))


def test_standard_signature_by_another_key_is_refused():
    v = STANDARD[0]
    other = StandardWebhook("whsec_" + base64.b64encode(bytes(32)).decode())
    headers = other.headers(v["webhook-id"], body_of(v))
    with pytest.raises(SignatureError):
        StandardWebhook(v["secret"]).verify(body_of(v), headers)


def test_standard_fresh_headers_verify_now():
    wh = StandardWebhook(STANDARD[0]["secret"])
    headers = wh.headers("msg_1", b'{"a":1}')
    wh.verify(b'{"a":1}', headers)
