"""RegoPolicy modules compiled once with regopy (rego-cpp) and evaluated per connection under a lock.

regopy's public Output parses the result as JSON and fails on error results, losing the message, so
evaluation reads the raw output through regopy.rego_shared. A module is built into a bundle at config time
(evaluation of a bundle is several times faster than re-planning a query) and probed once with a typical
input: rego-cpp reports some static errors (an unknown function) only at evaluation.

regopy (rego-cpp and its own OpenSSL copy: ~11 MB resident) is imported with the first RegoPolicy compiled,
not with the agent: most nodes enforce none. Failing to load it is a compile error (the update NACKs).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from agent.policy.errors import PolicyError
from api.resources.policy import RegoPolicy

_ERRORMSG = re.compile(r"\(errormsg (\d+):")

PROBE_INPUT: Mapping[str, Any] = {
    "source_principal": "spiffe://cluster.local/ns/default/sa/default",
    "source_namespace": "default",
    "source_service_account": "default",
    "source_ip": "10.0.0.1",
    "destination_ip": "10.0.0.2",
    "destination_port": 80,
    "destination_workload": "default/probe",
    "destination_namespace": "default",
    "destination_labels": {},
    "tls": True,
    "trust_domain": "cluster.local",
}


class RegoEvalError(Exception):
    """One evaluation failed; the caller denies (fail closed) with this message as the reason."""


class RegoUndefined(RegoEvalError):
    """The query has no value for this input (no rule matched and the module has no default)."""


def error_text(raw: str) -> str:
    """The errormsg texts of a rego-cpp error tree (length-prefixed strings), joined."""
    msgs = []
    for m in _ERRORMSG.finditer(raw):
        start = m.end()
        msgs.append(raw[start : start + int(m.group(1))])
    return "; ".join(msgs) if msgs else raw.strip()[:200]


def _verdict(raw: str) -> tuple[bool, str]:
    if raw == "undefined":
        raise RegoUndefined("query result is undefined (no rule matched and no default)")
    if raw.startswith("(error") or "(errormsg " in raw:  # errors can sit inside a result value
        raise RegoEvalError(error_text(raw))
    try:
        doc = json.loads(raw)
    except ValueError:
        raise RegoEvalError(f"unreadable result: {raw[:200]}") from None
    results = doc if isinstance(doc, list) else [doc]
    values = [v for r in results if isinstance(r, dict) for v in r.get("expressions", [])]
    if len(values) != 1:
        raise RegoEvalError(f"query must yield exactly one value, got {len(values)}")
    value = values[0]
    if isinstance(value, bool):
        return value, ""
    if isinstance(value, dict) and isinstance(value.get("allow"), bool):
        reason = value.get("reason", "")
        return value["allow"], reason if isinstance(reason, str) else json.dumps(reason)
    raise RegoEvalError(f"result must be a bool or {{allow: bool, reason: string}}, got {json.dumps(value)}")


def _regopy() -> ModuleType:
    """The regopy package, loaded on first use (with its rego_shared bindings)."""
    try:
        import regopy
        import regopy.rego_shared  # noqa: F401  (the raw-output calls evaluate() uses)
    except ImportError as exc:
        raise PolicyError(f"RegoPolicy support does not load (regopy): {exc}") from None
    return regopy


class RegoModule:
    """One RegoPolicy, compiled. `evaluate` is thread-safe (one interpreter, one lock)."""

    def __init__(self, policy: RegoPolicy) -> None:
        self.name = policy.uid
        self.selector = policy.selector
        self.namespace = policy.meta.namespace
        self.query = policy.query
        self._lock = threading.Lock()
        self._rp = rp = _regopy()
        self._rego = rp.Interpreter()
        self._rego.log_level = rp.LogLevel.NONE  # rego-cpp otherwise prints parse errors on stdout
        try:
            self._rego.add_module(policy.meta.name, policy.module)
            self._bundle = self._rego.build(policy.query)
        except rp.RegoError as exc:
            raise PolicyError(
                f"RegoPolicy {self.name}: module does not compile: {error_text(str(exc))}"
            ) from None
        if not self._bundle.ok():
            raise PolicyError(f"RegoPolicy {self.name}: query {policy.query!r} does not build")
        try:
            self.evaluate(PROBE_INPUT)
        except RegoUndefined:
            pass  # legitimate for this input; evaluation denies it when it happens for real
        except RegoEvalError as exc:
            raise PolicyError(f"RegoPolicy {self.name}: evaluation of a probe input fails: {exc}") from None

    def evaluate(self, document: Mapping[str, Any]) -> tuple[bool, str]:
        """(allow, reason) for one input document; RegoEvalError when the module errors."""
        shared = self._rp.rego_shared
        with self._lock:
            try:
                self._rego.set_input(dict(document))
                out = shared.rego_bundle_query(self._rego._impl, self._bundle._impl)
            except self._rp.RegoError as exc:
                raise RegoEvalError(error_text(str(exc))) from None
            try:
                if not shared.rego_output_ok(out):
                    raise RegoEvalError("evaluation error (e.g. conflicting values for a complete rule)")
                raw = shared.rego_output_string(out)
            finally:
                shared.rego_free_output(out)
        return _verdict(raw)
