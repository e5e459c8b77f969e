"""The extra CONNECT request headers (`forwarded`, W3C `baggage` and `traceparent`, as ztunnel sends them):
sent by open_stream, reported raw (bounded) on stream_request."""

from __future__ import annotations

import socket
from pathlib import Path

import hpack
import pytest
from engine_testkit import Events, Pki, contexts, tcp_pair, tunnel
from test_engine_bad_peers import EMPTY_SETTINGS, PREFACE, frame_header, raw_client

from native.engine import Engine, EngineError, Event

INVALID = " invalid (repeated or too long)"


@pytest.mark.parametrize(
    "ip,header", [("10.244.1.2", "for=10.244.1.2"), ("fd00::2", 'for="[fd00::2]"'), ("", "")]
)
def test_open_stream_sends_forwarded(engine: Engine, events: Events, pki: Pki, ip: str, header: str) -> None:
    t = tunnel(engine, events, pki)
    app, local = socket.socketpair()
    engine.open_stream(t.client, "10.244.2.2:80", local.detach(), forwarded=ip)
    req = events.kind("stream_request", conn_id=t.server)
    assert req.forwarded == header
    assert req.authority == "10.244.2.2:80"
    app.close()


BAGGAGE = (
    "k8s.cluster.name=c1,k8s.namespace.name=app,k8s.deployment.name=web,service.name=web,service.version=v1"
)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_open_stream_sends_baggage_and_traceparent(engine: Engine, events: Events, pki: Pki) -> None:
    t = tunnel(engine, events, pki)
    app, local = socket.socketpair()
    engine.open_stream(
        t.client,
        "10.244.2.2:80",
        local.detach(),
        forwarded="10.244.1.2",
        baggage=BAGGAGE,
        traceparent=TRACEPARENT,
    )
    req = events.kind("stream_request", conn_id=t.server)
    assert (req.forwarded, req.baggage, req.traceparent) == ("for=10.244.1.2", BAGGAGE, TRACEPARENT)
    app.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"forwarded": "10.0.0.1\r\nx: y"},
        {"baggage": "a=1\nx: y"},  # no line break can smuggle a second header
        {"baggage": "a=" + "b" * 600},  # bounded
        {"traceparent": "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},  # only version 00
        {"traceparent": TRACEPARENT + "\n"},
    ],
    ids=[
        "forwarded-crlf",
        "baggage-newline",
        "baggage-too-long",
        "traceparent-version",
        "traceparent-newline",
    ],
)
def test_bad_request_header_is_refused_and_fd_closed(
    engine: Engine, events: Events, pki: Pki, kwargs: dict[str, str]
) -> None:
    t = tunnel(engine, events, pki)
    app, local = socket.socketpair()
    with pytest.raises(EngineError):
        engine.open_stream(t.client, "10.244.2.2:80", local.detach(), **kwargs)
    assert app.recv(10) == b""  # the engine owned (and closed) the fd


def _raw_request(headers: list[tuple[str, str]]) -> bytes:
    block = hpack.Encoder().encode(headers)
    return PREFACE + EMPTY_SETTINGS + frame_header(len(block), 1, 0x4, 1) + block


@pytest.mark.parametrize(
    "extra,expect",
    [
        (
            [("forwarded", "for=10.0.0.1;by=x, for=1.2.3.4")],
            "for=10.0.0.1;by=x, for=1.2.3.4",
        ),  # raw: Python judges
        ([("forwarded", "for=10.0.0.1"), ("forwarded", "for=10.0.0.2")], INVALID),  # never combined
        ([("forwarded", "for=10.0.0.1;x=" + "y" * 300)], INVALID),  # never truncated
        ([], ""),
    ],
    ids=["raw", "repeated", "too-long", "absent"],
)
def test_hostile_forwarded_headers(
    engine: Engine, events: Events, pki: Pki, tmp_path: Path, extra: list[tuple[str, str]], expect: str
) -> None:
    assert _served(engine, events, pki, tmp_path, extra).forwarded == expect


@pytest.mark.parametrize(
    "extra,expect",
    [
        ([("baggage", "a=1"), ("baggage", "b=2")], (INVALID, "")),  # never combined
        ([("baggage", "a=" + "b" * 600)], (INVALID, "")),  # never truncated
        ([("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)], ("", INVALID)),
        ([("traceparent", "x" * 200)], ("", INVALID)),
        (
            [("baggage", "raw, judged=in Python"), ("traceparent", "not-w3c")],
            ("raw, judged=in Python", "not-w3c"),
        ),
    ],
    ids=["baggage-repeated", "baggage-too-long", "traceparent-repeated", "traceparent-too-long", "raw"],
)
def test_hostile_telemetry_headers(
    engine: Engine,
    events: Events,
    pki: Pki,
    tmp_path: Path,
    extra: list[tuple[str, str]],
    expect: tuple[str, str],
) -> None:
    req = _served(engine, events, pki, tmp_path, extra)
    assert (req.baggage, req.traceparent) == expect


def _served(engine: Engine, events: Events, pki: Pki, tmp_path: Path, extra: list[tuple[str, str]]) -> Event:
    _, sctx = contexts(engine, pki)
    raw, ours = tcp_pair()
    sid = engine.serve_hbone(ours.detach(), sctx)
    with raw_client(pki, tmp_path).wrap_socket(raw) as tls:
        tls.sendall(_raw_request([(":method", "CONNECT"), (":authority", "10.244.2.2:80"), *extra]))
        req = events.kind("stream_request", conn_id=sid)
        engine.reject_stream(sid, req.stream_id, 403)
        events.kind("stream_closed", conn_id=sid)
    return req
