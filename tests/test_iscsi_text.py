"""Text key codec and operational negotiation (RFC 7143 §6, §13)."""

from __future__ import annotations

import pytest

from steelfusion.iscsi.pdu import IscsiProtocolError
from steelfusion.iscsi.text import (
    IRRELEVANT,
    NOT_UNDERSTOOD,
    REJECT,
    Negotiator,
    SessionParams,
    TargetLimits,
    decode_text,
    encode_text,
    send_targets,
    split_text,
)
from tests.iscsi_helpers import LIBISCSI_KEYS


def test_codec_round_trip() -> None:
    pairs = [("InitiatorName", "iqn.2024-01.x:y"), ("TargetAlias", "Bob's disk é"),
             ("Empty", ""), ("Eq", "a=b")]
    wire = encode_text(pairs)
    assert wire.endswith(b"\0") and wire.count(b"\0") == 4
    assert decode_text(wire) == pairs
    assert decode_text(wire + b"\0\0\0") == pairs  # padding / stray NULs
    assert decode_text(memoryview(wire)) == pairs


@pytest.mark.parametrize("bad", [b"NoEquals\0", b"=value\0", b"K=\xff\xfe\0",
                                 b"K" * 64 + b"=v\0", b"K=" + b"v" * 9000 + b"\0"])
def test_codec_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(IscsiProtocolError):
        decode_text(bad)


def test_libiscsi_offer() -> None:
    n = Negotiator()
    ans = dict(n.respond(LIBISCSI_KEYS))
    assert ans["HeaderDigest"] == "None"  # first offered value we support
    assert ans["DataDigest"] == "None"
    assert ans["InitialR2T"] == "No"  # OR(No, No)
    assert ans["ImmediateData"] == "Yes"  # AND(Yes, Yes)
    assert ans["MaxBurstLength"] == "262144"  # Min(262144, 1 MiB)
    assert ans["FirstBurstLength"] == "262144"
    assert ans["DefaultTime2Wait"] == "2"  # Max
    assert ans["DefaultTime2Retain"] == "0"  # Min
    assert ans["ErrorRecoveryLevel"] == "0"
    assert ans["MaxConnections"] == "1"
    assert ans["IFMarker"] == "No" and ans["OFMarker"] == "No"
    assert "MaxRecvDataSegmentLength" not in ans  # declarative: recorded, not echoed
    p = n.params
    assert p.max_recv_data_segment_length == 262144
    assert p.target_max_recv_data_segment_length == TargetLimits().max_recv_data_segment_length
    assert p.initial_r2t is False and p.immediate_data is True
    assert p.header_digest is False
    assert n.declarations() == [("MaxRecvDataSegmentLength", "262144")]
    assert n.declarations() == []  # only once per login


def test_digest_lists() -> None:
    n = Negotiator()
    assert n.respond([("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C")]) == [
        ("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]
    assert n.params.header_digest and n.params.data_digest
    n2 = Negotiator(TargetLimits(digests=("None",)))
    assert n2.respond([("HeaderDigest", "CRC32C,None")]) == [("HeaderDigest", "None")]
    assert n2.respond([("DataDigest", "CRC32C,Y-foo")]) == [("DataDigest", REJECT)]


def test_min_max_or_and() -> None:
    lim = TargetLimits(max_burst_length=65536, first_burst_length=16384, max_outstanding_r2t=4,
                       initial_r2t=True, immediate_data=False, default_time2wait=5)
    n = Negotiator(lim)
    ans = dict(n.respond([("MaxBurstLength", "1048576"), ("FirstBurstLength", "512"),
                          ("MaxOutstandingR2T", "16"), ("InitialR2T", "No"),
                          ("ImmediateData", "Yes"), ("DefaultTime2Wait", "1"),
                          ("DataPDUInOrder", "No")]))
    assert ans == {"MaxBurstLength": "65536", "FirstBurstLength": "512",
                   "MaxOutstandingR2T": "4", "InitialR2T": "Yes", "ImmediateData": "No",
                   "DefaultTime2Wait": "5", "DataPDUInOrder": "Yes"}
    p = n.params
    assert (p.max_burst_length, p.first_burst_length, p.max_outstanding_r2t) == (65536, 512, 4)
    assert p.initial_r2t and not p.immediate_data


@pytest.mark.parametrize("order", [0, 1])
def test_first_burst_never_exceeds_max_burst(order: int) -> None:
    offer = [("FirstBurstLength", "262144"), ("MaxBurstLength", "8192")]
    if order:
        offer.reverse()
    n = Negotiator()
    ans = dict(n.respond(offer))
    assert ans["FirstBurstLength"] == "8192"
    assert n.params.first_burst_length <= n.params.max_burst_length == 8192


@pytest.mark.parametrize("key,value", [
    ("MaxBurstLength", "100"), ("MaxBurstLength", "abc"), ("MaxConnections", "0"),
    ("ErrorRecoveryLevel", "3"), ("InitialR2T", "yes"), ("MaxRecvDataSegmentLength", "1"),
    ("DefaultTime2Wait", "3601"), ("TargetAlias", "x"),
])
def test_invalid_values_are_rejected(key: str, value: str) -> None:
    assert Negotiator().respond([(key, value)]) == [(key, REJECT)]


def test_unknown_and_vendor_keys_not_understood() -> None:
    n = Negotiator()
    assert n.respond([("X-com.example.Foo", "1"), ("FooBar", "x")]) == [
        ("X-com.example.Foo", NOT_UNDERSTOOD), ("FooBar", NOT_UNDERSTOOD)]


def test_discovery_irrelevant_keys() -> None:
    n = Negotiator(discovery=True)
    ans = dict(n.respond(LIBISCSI_KEYS))
    for k in ("InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
              "MaxOutstandingR2T", "MaxConnections", "DataPDUInOrder", "DataSequenceInOrder"):
        assert ans[k] == IRRELEVANT, k
    assert ans["ErrorRecoveryLevel"] == "0"
    assert ans["HeaderDigest"] == "None"


def test_answers_to_our_offers_and_declaratives_are_silent() -> None:
    n = Negotiator()
    assert n.respond([("InitiatorName", "iqn.a"), ("SessionType", "Normal"),
                      ("HeaderDigest", NOT_UNDERSTOOD), ("Foo", IRRELEVANT)]) == []


def test_markers_and_protocol_level() -> None:
    n = Negotiator()
    assert n.respond([("IFMarkInt", "2048~8192"), ("iSCSIProtocolLevel", "2"),
                      ("SendTargets", "All")]) == [
        ("IFMarkInt", IRRELEVANT), ("iSCSIProtocolLevel", "1"), ("SendTargets", IRRELEVANT)]


def test_hex_numbers() -> None:
    n = Negotiator()
    assert n.respond([("MaxBurstLength", "0x2000")]) == [("MaxBurstLength", "8192")]


def test_defaults_are_rfc_defaults() -> None:
    p = SessionParams()
    assert (p.initial_r2t, p.immediate_data, p.max_recv_data_segment_length,
            p.max_burst_length, p.first_burst_length, p.max_outstanding_r2t) == (
        True, True, 8192, 262144, 65536, 1)


def test_split_text_on_nul_boundaries() -> None:
    wire = encode_text([("TargetName", f"iqn.2024-01.x:t{i}") for i in range(50)])
    pieces = split_text(wire, 100)
    assert b"".join(pieces) == wire
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith(b"\0") for p in pieces)
    assert split_text(b"x" * 10, 4) == [b"xxxx", b"xxxx", b"xx"]
    with pytest.raises(ValueError):
        split_text(b"x", 0)


def test_send_targets() -> None:
    targets = [("iqn.a", ["10.0.0.1:3260,1"]), ("iqn.b", ["10.0.0.1:3260,1", "[::1]:3260,1"])]
    assert send_targets("All", targets, None) == [
        ("TargetName", "iqn.a"), ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetName", "iqn.b"), ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetAddress", "[::1]:3260,1")]
    assert send_targets("", targets, "iqn.b")[0] == ("TargetName", "iqn.b")
    assert send_targets("iqn.a", targets, None) == [("TargetName", "iqn.a"),
                                                    ("TargetAddress", "10.0.0.1:3260,1")]
    for bad in ("Alle", "A", "aLL"):
        assert send_targets(bad, targets, None) == [("SendTargets", REJECT)]
    assert send_targets("", targets, None) == [("SendTargets", REJECT)]
