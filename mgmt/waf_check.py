"""The gateway's config-time check of a WafPolicy, run by the plane: the admission webhook refuses what
fails it (`kubectl apply` prints the reason) and the Kubernetes source writes it into the policy's status.

It is the gateway's own (gateway/waf.py): exclusions must name rule ids and tags of the CRS installed,
custom rules may only be SecRule/SecAction/SecMarker, and custom rules are compiled by libmodsecurity when
the gateway's extension is present here (the image has it). Verdicts are cached by the policy's rule text
(bounded): compiling loads the CRS, ~100 ms.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from typing import Any

from api.resources import ResourceError, load_kinds, parse
from api.resources.wafpolicy import WafPolicy
from mgmt.policy_check import PolicyRejected, authored

MAX_VERDICTS = 256
_verdicts: dict[str, str | None] = {}
_lock = threading.Lock()


def refusal(policy: WafPolicy) -> str | None:
    """Why the gateway would refuse `policy` at config time, or None."""
    try:
        from gateway import waf
    except ImportError:  # the gateway's extension is not built here: the parser's verdict stands
        return None
    try:
        text = waf.rules_text(policy)
    except (waf.WafConfigError, OSError) as exc:
        return str(exc)
    digest = hashlib.sha256(text.encode()).hexdigest()
    with _lock:
        if digest in _verdicts:
            return _verdicts[digest]
    verdict: str | None = None
    if policy.custom_rules:  # exclusions were checked against the CRS catalogue; custom rules must compile
        try:
            waf.WafRules(text)
        except waf.DataplaneError as exc:
            verdict = f"WafPolicy {policy.meta.namespace}/{policy.meta.name}: rules refused: {exc}"
    with _lock:
        if len(_verdicts) >= MAX_VERDICTS:
            _verdicts.clear()
        _verdicts[digest] = verdict
    return verdict


def check_waf_policy(obj: Mapping[str, Any], namespace: str = "") -> WafPolicy:
    """The parsed policy, or PolicyRejected naming the first problem (the webhook's verdict)."""
    load_kinds()
    try:
        policy = parse(authored(obj, namespace))
    except ResourceError as exc:
        raise PolicyRejected(str(exc)) from None
    if not isinstance(policy, WafPolicy):
        raise PolicyRejected(f"kind {obj.get('kind')!r} is not a WafPolicy")
    problem = refusal(policy)
    if problem is not None:
        raise PolicyRejected(problem)
    return policy
