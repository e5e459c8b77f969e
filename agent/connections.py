"""One record per proxied connection: what the proxy reports and what logs, metrics and admin read.

The proxy owns the connections; observers only receive these immutable records.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol


class Direction(enum.Enum):
    OUTBOUND = "outbound"  # captured from a local pod, sent through HBONE
    INBOUND = "inbound"  # arrived on 15008 (HBONE) or 15006 (plaintext), delivered to a local pod
    PASSTHROUGH = "passthrough"  # captured, destination not in the mesh: forwarded in clear

    __hash__ = object.__hash__  # members are singletons: a C identity hash (Enum's is Python, per lookup)


@dataclass(frozen=True)
class ConnectionRecord:
    conn_id: int
    direction: Direction
    source_ip: str
    source_port: int
    destination_ip: str
    destination_port: int
    source_principal: str = ""  # SPIFFE ID as text, "" when unknown/plaintext
    destination_principal: str = ""
    source_workload: str = ""  # "<ns>/<name>"
    destination_workload: str = ""
    security_policy: str = "mutual_tls"  # Istio's connection_security_policy: mutual_tls | none
    policy: str = ""  # "<ns>/<name>" of the deciding authorization policy
    tls_version: str = ""
    tls_cipher: str = ""
    peer_cert_sha256: str = ""
    start_time: float = 0.0  # time.time()
    trace_id: str = ""  # W3C trace id of the HBONE stream (its traceparent): both sides record the same

    def derive(self, **changes: Any) -> ConnectionRecord:
        """A copy with `changes`, as `dataclasses.replace` makes it but built from this record's fields
        without running the generated constructor (a frozen dataclass's sets each of its 17 fields through
        object.__setattr__): the proxy derives one record per connection from a template."""
        if not changes.keys() <= _RECORD_FIELDS:
            raise TypeError(f"not ConnectionRecord fields: {sorted(changes.keys() - _RECORD_FIELDS)}")
        new = object.__new__(ConnectionRecord)
        fields = new.__dict__
        fields.update(self.__dict__)
        fields.update(changes)
        return new


_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(ConnectionRecord))


class ConnectionClose(NamedTuple):
    """How a connection ended (immutable). A named tuple: one is built per connection on the proxy's hot
    path, and a frozen dataclass's constructor costs several times as much."""

    record: ConnectionRecord
    bytes_sent: int  # towards the destination
    bytes_received: int  # from the destination
    duration_s: float
    response_flags: str = "-"  # Istio-style: "-" ok, "DENY" denied by policy, "UF" upstream failure, ...
    error: str = ""


class ConnectionObserver(Protocol):
    def opened(self, record: ConnectionRecord) -> None: ...

    def closed(self, close: ConnectionClose) -> None: ...
