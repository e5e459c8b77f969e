"""ztunnel's side of HBONE, byte for byte as Istio ambient speaks it, for the wire tests (Python h2 + ssl).

Wire facts played here (from ztunnel's behaviour and Istio's HBONE docs; no ztunnel code):
- the outer connection runs from the source pod's IP to `<destination pod ip>:15008`; TLS 1.3, ALPN h2,
  no SNI; each side presents its workload's SVID (`spiffe://td/ns/N/sa/S`) and the client requires exactly
  the destination workload's identity;
- HTTP/2 SETTINGS: 200 concurrent streams, 1 MiB frames (SETTINGS_MAX_FRAME_SIZE), large windows;
- the client's CONNECT carries `:authority <pod ip>:<port>`, `forwarded: for="ip:port"`, `baggage`
  (k8s.cluster.name, k8s.namespace.name, k8s.<kind>.name, service.name, service.version) and a W3C
  `traceparent`;
- the server answers 400 when the authority's IP is not the address the connection was accepted on, 401
  when policy denies, 200 otherwise (then the stream is the TCP payload: this fake echoes it); draining, it
  sends a graceful GOAWAY (NO_ERROR, the last stream it served) and keeps the connection open. To test
  what a peer may do after a stream completed, a stream to a `close_ports` port ends the connection right
  after its END_STREAM (no GOAWAY), one to a `goaway_close_ports` port after a GOAWAY.

`python fake_ztunnel.py serve CONFIG` runs the server (in a node netns, listening transparently on
0.0.0.0:15008, the capture's tproxy hands it `<pod ip>:15008`), writing one JSON line per stream to
CONFIG["events"]. `connect(...)` is the client, run in a node netns with agent.netns.run_in.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

HBONE_PORT = 15008
IP_TRANSPARENT = 19
MAX_STREAMS = 200  # ztunnel's SETTINGS_MAX_CONCURRENT_STREAMS
FRAME = 1 << 20  # ztunnel accepts (and sends) 1 MiB DATA frames
WINDOW = 4 << 20
SETTINGS = {
    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME,
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
}


def _tls_context(server: bool, chain_pem: str, key_pem: str, bundle_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE: the URI SAN is checked, never a host name (no SNI is sent)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem)
    # ssl loads keys only from files: a private temporary directory, removed right away.
    with tempfile.TemporaryDirectory() as tmp:
        chain, key = Path(tmp, "chain.pem"), Path(tmp, "key.pem")
        chain.write_text(chain_pem)
        key.touch(0o600)
        key.write_text(key_pem)
        ctx.load_cert_chain(chain, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def peer_uri_san(tls: ssl.SSLSocket) -> str:
    cert: dict[str, Any] = dict(tls.getpeercert() or {})
    uris = [str(entry[1]) for entry in cert.get("subjectAltName", ()) if entry[0] == "URI"]
    return uris[0] if len(uris) == 1 else ""


def _h2(client: bool) -> h2.connection.H2Connection:
    """An h2 connection whose one SETTINGS frame is ztunnel's (sent by initiate_connection)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding="utf-8"))
    conn.local_settings = h2.settings.Settings(client=client, initial_values=SETTINGS)
    # Settings given as initial values count as acknowledged, so h2 would keep its 16 KiB read limit.
    conn.max_inbound_frame_size = FRAME
    conn.incoming_buffer.max_frame_size = FRAME
    conn.initiate_connection()
    conn.increment_flow_control_window(WINDOW * 4)
    return conn


def _remote_settings(conn: h2.connection.H2Connection) -> dict[str, int]:
    rs = conn.remote_settings
    return {
        "max_concurrent_streams": int(rs.max_concurrent_streams),
        "max_frame_size": int(rs.max_frame_size),
        "initial_window_size": int(rs.initial_window_size),
    }


@dataclass
class _Stream:
    """One stream's pending echo (server) or upload (client) and what arrived."""

    outgoing: bytearray = field(default_factory=bytearray)
    end_after: bool = False  # END_STREAM once outgoing is flushed
    received: bytearray = field(default_factory=bytearray)
    sent_end: bool = False  # END_STREAM went out
    goaway_after: bool = False  # server: a graceful GOAWAY once this stream is done (ztunnel draining)
    close_after: bool = False  # server: close the TCP connection once this stream is done
    frames: list[int] = field(default_factory=list)  # sizes of the DATA frames we sent


def _flush(conn: h2.connection.H2Connection, sid: int, st: _Stream) -> None:
    """Send what flow control allows, in frames as large as the peer accepts (up to 1 MiB)."""
    while st.outgoing:
        room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(st.outgoing))
        if room <= 0:
            return
        conn.send_data(sid, bytes(st.outgoing[:room]))
        st.frames.append(room)
        del st.outgoing[:room]
    if st.end_after:
        conn.end_stream(sid)
        st.end_after = False
        st.sent_end = True


def _pump(tls: ssl.SSLSocket, conn: h2.connection.H2Connection, timeout: float = 10.0) -> list[Any]:
    out = conn.data_to_send()
    if out:
        tls.sendall(out)
    if not tls.pending():
        ready, _, _ = select.select([tls], [], [], timeout)
        if not ready:
            raise TimeoutError("no HTTP/2 frames from the peer")
    data = tls.recv(1 << 20)
    if not data:
        raise ConnectionError("peer closed the connection")
    return conn.receive_data(data)


# --- server ---------------------------------------------------------------------------------------


class Server:
    """The HBONE server half: one thread per accepted connection."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        # The certificate presented on each local address: the workload's own (or, to test the client's
        # check, another workload's).
        self.contexts = {
            ip: _tls_context(True, chain, key, cfg["bundle_pem"])
            for ip, (chain, key) in cfg["present"].items()
        }
        self.deny_ports = set(cfg.get("deny_ports", []))
        self.goaway_ports = set(cfg.get("goaway_ports", []))
        self.close_ports = set(cfg.get("close_ports", []))
        self.goaway_close_ports = set(cfg.get("goaway_close_ports", []))
        self._out = open(cfg["events"], "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        self._lock = threading.Lock()

    def emit(self, doc: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(doc) + "\n")

    def run(self) -> None:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        lsock.bind(("0.0.0.0", HBONE_PORT))
        lsock.listen(128)
        print("ready", flush=True)
        while True:
            sock, _ = lsock.accept()
            threading.Thread(target=self._connection, args=(sock,), daemon=True).start()

    def _connection(self, sock: socket.socket) -> None:
        local_ip, local_port = sock.getsockname()[:2]
        peer = list(sock.getpeername()[:2])
        ctx = self.contexts.get(local_ip)
        if ctx is None:  # no workload of ours at that address: nothing to present
            self.emit({"kind": "no_identity", "local": [local_ip, local_port], "peer": peer})
            sock.close()
            return
        try:
            with ctx.wrap_socket(sock, server_side=True) as tls:
                self._serve(tls, local_ip, peer)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            self.emit(
                {"kind": "conn_error", "local": [local_ip, local_port], "peer": peer, "error": str(exc)}
            )

    def _serve(self, tls: ssl.SSLSocket, local_ip: str, peer: list[Any]) -> None:
        conn = _h2(client=False)
        streams: dict[int, _Stream] = {}
        base = {
            "local": local_ip,
            "peer": peer,
            "peer_id": peer_uri_san(tls),
            "alpn": tls.selected_alpn_protocol(),
        }
        while True:
            try:
                events = _pump(tls, conn, timeout=30.0)
            except (ConnectionError, TimeoutError, h2.exceptions.ProtocolError):
                return  # h2 refuses frames after our GOAWAY: the connection is done
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    streams[ev.stream_id] = _Stream()
                    self._request(conn, ev, base, local_ip, streams)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    st = streams.get(ev.stream_id)
                    if st is not None:
                        st.received += ev.data
                        st.outgoing += ev.data  # the echo
                elif isinstance(ev, h2.events.StreamEnded):
                    st = streams.get(ev.stream_id)
                    if st is not None:
                        st.end_after = True
                        self.emit(
                            {**base, "kind": "stream_end", "stream": ev.stream_id, "bytes": len(st.received)}
                        )
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.emit({**base, "kind": "goaway", "error_code": int(ev.error_code or 0)})
                    tls.sendall(conn.data_to_send())
                    return
            for sid, st in list(streams.items()):
                if st.outgoing or st.end_after:
                    try:
                        _flush(conn, sid, st)
                    except h2.exceptions.StreamClosedError:
                        streams.pop(sid)
                if st.goaway_after and st.sent_end:
                    # Graceful: streams up to this one complete, no new one may start; the socket stays open.
                    conn.close_connection(error_code=0, last_stream_id=sid)
                    st.goaway_after = False
                    self.emit({**base, "kind": "sent_goaway", "stream": sid})
                if st.close_after and st.sent_end:
                    tls.sendall(conn.data_to_send())  # the last DATA, END_STREAM (and GOAWAY), then EOF
                    self.emit({**base, "kind": "closed_after_stream", "stream": sid})
                    return

    def _request(
        self,
        conn: h2.connection.H2Connection,
        ev: h2.events.RequestReceived,
        base: dict[str, Any],
        local_ip: str,
        streams: dict[int, _Stream],
    ) -> None:
        headers: dict[str, str] = {}
        for name, value in ev.headers:
            headers.setdefault(str(name), str(value))
        authority = headers.get(":authority", "")
        host, _, port = authority.rpartition(":")
        host = host.strip("[]")
        if headers.get(":method") != "CONNECT" or host != local_ip:
            status = 400  # ztunnel: the authority must name the address the connection was dialled to
        elif port.isdigit() and int(port) in self.deny_ports:
            status = 401  # ztunnel's policy denial
        else:
            status = 200
        self.emit({
            **base, "kind": "request", "stream": ev.stream_id, "headers": headers, "status": status,
            "settings": _remote_settings(conn),
        })  # fmt: skip
        end = status != 200
        conn.send_headers(ev.stream_id, [(":status", str(status))], end_stream=end)
        if end:
            streams.pop(ev.stream_id, None)
        elif port.isdigit() and int(port) in self.goaway_ports:
            streams[ev.stream_id].goaway_after = True
        elif port.isdigit() and int(port) in self.close_ports | self.goaway_close_ports:
            streams[ev.stream_id].goaway_after = int(port) in self.goaway_close_ports
            streams[ev.stream_id].close_after = True


# --- client ---------------------------------------------------------------------------------------


class PeerIdentityError(ConnectionError):
    """The server presented another identity than the destination workload's."""


@dataclass(frozen=True)
class Request:
    authority: str
    payload: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()  # sent after :method/:authority


def connect(
    source_ip: str,
    destination_ip: str,
    chain_pem: str,
    key_pem: str,
    bundle_pem: str,
    requests: Iterable[Request],
    expected_peer: str,
    timeout: float = 15.0,
) -> dict[str, Any]:
    """Play ztunnel's client: from `source_ip` (a pod's address, bound transparently) to
    `<destination_ip>:15008`, requiring the server to be `expected_peer` (the destination workload's SPIFFE
    ID: anything else fails the connection, PeerIdentityError), one connection, the requests as concurrent
    streams, each echo read back. Returns what was observed: the server's URI SAN, its SETTINGS, each
    stream's status, echo and frame sizes."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    raw.bind((source_ip, 0))
    raw.settimeout(timeout)
    raw.connect((destination_ip, HBONE_PORT))
    ctx = _tls_context(False, chain_pem, key_pem, bundle_pem)
    with ctx.wrap_socket(raw, server_hostname=None) as tls:  # no SNI, as ztunnel
        if peer_uri_san(tls) != expected_peer:
            raise PeerIdentityError(f"server is {peer_uri_san(tls)!r}, not {expected_peer!r}")
        conn = _h2(client=True)
        todo = list(requests)
        streams: dict[int, _Stream] = {}
        status: dict[int, int] = {}
        order: list[int] = []
        for req in todo:
            sid = conn.get_next_available_stream_id()
            order.append(sid)
            conn.send_headers(sid, [(":method", "CONNECT"), (":authority", req.authority), *req.headers])
            streams[sid] = _Stream(outgoing=bytearray(req.payload))
        settled: set[int] = set()
        while len(settled) < len(order):
            for ev in _pump(tls, conn, timeout):
                if isinstance(ev, h2.events.ResponseReceived):
                    code = int(dict((str(k), str(v)) for k, v in ev.headers or []).get(":status", "0"))
                    status[ev.stream_id] = code
                    if code == 200:
                        streams[ev.stream_id].end_after = True
                    else:
                        streams[ev.stream_id].outgoing.clear()
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    streams[ev.stream_id].received += ev.data
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    settled.add(ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    settled.update(order)
            for sid in order:
                st = streams[sid]
                if sid in status and status[sid] == 200 and (st.outgoing or st.end_after):
                    try:
                        _flush(conn, sid, st)
                    except h2.exceptions.StreamClosedError:
                        settled.add(sid)
        tls.sendall(conn.data_to_send())
        result = {
            "server_id": peer_uri_san(tls),
            "tls_version": tls.version(),
            "alpn": tls.selected_alpn_protocol(),
            "local": list(tls.getsockname()[:2]),
            "settings": _remote_settings(conn),
            "streams": [
                {
                    "status": status.get(sid, 0),
                    "echoed": bytes(streams[sid].received) == req.payload and status.get(sid) == 200,
                    "received": len(streams[sid].received),
                    "frames": streams[sid].frames,
                }
                for sid, req in zip(order, todo, strict=True)
            ],
        }
        conn.close_connection()
        tls.sendall(conn.data_to_send())
        return result


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "serve":
        print(__doc__, file=sys.stderr)
        return 2
    os.umask(0o077)
    Server(json.loads(Path(argv[2]).read_text())).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
