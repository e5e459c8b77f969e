"""Admin API views built from what the node holds: certificates as chains, policies in full.

The daemon registers these as admin providers (agent/admin.py serves them, redacted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from api.resources.policy import Rule

log = logging.getLogger(__name__)


def cert_info(cert: x509.Certificate, kind: str) -> dict[str, Any]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "type": kind,
        "subject": cert.subject.rfc4514_string(),
        "san": ",".join(uris),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": hashlib.sha256(der).hexdigest(),
    }


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def chain(chain_pem: bytes, anchors: list[x509.Certificate]) -> list[dict[str, Any]]:
    """leaf, intermediates, then the trust-bundle root the chain verifies against ("root"), or a
    "root" entry saying none does (the chain would be refused)."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    out = [cert_info(c, "leaf" if i == 0 else "intermediate") for i, c in enumerate(certs)]
    root = next((a for a in anchors if _issued_by(certs[-1], a)), None)
    if root is None:
        out.append(
            {
                "type": "root",
                "subject": "",
                "issuer": certs[-1].issuer.rfc4514_string(),
                "state": "NOT IN BUNDLE",
            }
        )
    else:
        out.append(cert_info(root, "root"))
    return out


def bundle(bundle_pem: bytes) -> list[dict[str, Any]]:
    return (
        [cert_info(c, "trust anchor") for c in x509.load_pem_x509_certificates(bundle_pem)]
        if bundle_pem
        else []
    )


def certificates(
    rows: list[dict[str, Any]], chain_of: Callable[[dict[str, Any]], bytes | None], bundle_pem: bytes
) -> list[dict[str, Any]]:
    """The identity manager's rows (one per identity, as before) with each one's `chain` added."""
    anchors = x509.load_pem_x509_certificates(bundle_pem) if bundle_pem else []
    out = []
    for row in rows:
        full = dict(row)
        try:
            pem = chain_of(row)
            full["chain"] = chain(pem, anchors) if pem else []
        except Exception as exc:  # one unreadable identity must not hide the others
            log.warning("certificate chain of %s: %s", row.get("identity"), exc)
            full["chain"] = []
        out.append(full)
    return out


# -- policies --------------------------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _render(value: Any) -> Any:
    if isinstance(value, Rule):  # Istio's own shape: from / to / when
        rule = {
            "from": [{"source": _render(s)} for s in value.sources],
            "to": [{"operation": _render(o)} for o in value.operations],
            "when": [_render(c) for c in value.conditions],
        }
        return {k: v for k, v in rule.items() if v}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return spec_of(value)
    if isinstance(value, Mapping):
        return {str(k): _render(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_render(v) for v in value]
    return value


def spec_of(obj: Any) -> dict[str, Any]:
    """A policy object's fields as Istio spells them (camelCase, empty ones left out)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.name in ("meta", "kind"):
            continue
        value = _render(getattr(obj, f.name))
        if value in (None, "", [], {}):
            continue
        out[_camel(f.name)] = value
    return out


def policies(rows: list[dict[str, Any]], objects: tuple[Any, ...]) -> list[dict[str, Any]]:
    """The policy engine's rows, each with the whole `spec` of the policy it describes."""
    by_key = {(p.kind, p.meta.namespace, p.meta.name): p for p in objects}
    out = []
    for row in rows:
        obj = by_key.get((row.get("kind"), row.get("namespace"), row.get("name")))
        out.append(dict(row) | ({"spec": spec_of(obj)} if obj is not None else {}))
    return out
