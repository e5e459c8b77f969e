"""What the proxy asks the policy engine and what it answers: the contract between proxy/ and policy/."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from api.spiffe import SpiffeId


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


@dataclass(frozen=True)
class ConnectionAttrs:
    """Attributes of one inbound connection at the destination node, known before any byte is relayed."""

    source_principal: SpiffeId | None  # None for plaintext (PERMISSIVE) connections
    source_ip: str
    destination_ip: str
    destination_port: int
    destination_workload: str  # "<namespace>/<name>"
    destination_namespace: str
    tls: bool = True  # False when the connection arrived in plaintext (port 15006)


@dataclass(frozen=True)
class Decision:
    allow: bool
    policy: str  # "<namespace>/<name>" of the deciding policy, or "" for the default
    reason: str
    audited: bool = False  # an AUDIT policy matched: the decision goes to the audit log
    dry_run: bool = False  # a dry-run policy would have changed the outcome
    audit_policy: str = ""  # "<namespace>/<name>" of the matching AUDIT policy when audited
