"""`ambit.io/v1` WafPolicy: the gateway's web application firewall settings, attached by targetRefs to a
Gateway (every route of it) or an HTTPRoute (that route; a route's own policy replaces its Gateway's).

    spec:
      targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: shop}]
      mode: Block                 # or DetectOnly
      paranoiaLevel: 1            # CRS paranoia level 1-4
      inboundAnomalyThreshold: 5  # CRS inbound anomaly score that blocks
      requestBodyLimit: 1048576   # bytes; larger bodies are refused with 413
      exclusions:
        - ruleIds: ["942100", "920000-920999"]
        - tags: [attack-sqli]
        - ruleId: "942100"
          targets: ["ARGS:q", "REQUEST_COOKIES:/^sess/"]
      strictBodyParsing: false    # true: refuse bodies the XML/JSON/multipart parsers reject (400)
      customRules: ['SecRule ARGS:debug "@streq 1" "id:10001,phase:1,deny,status:403,msg:debug"']

Field syntax is checked here; whether rule ids, tags and targets exist in the CRS, and whether custom rules
compile, is checked by the gateway when it builds the rule set (gateway/waf.py), at config time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from api.resources import Meta, ResourceError, register

API_VERSION = "ambit.io/v1"
GATEWAY_GROUP = "gateway.networking.k8s.io"
MODES = ("Block", "DetectOnly")
TARGET_KINDS = ("Gateway", "HTTPRoute")
_RULE_ID = re.compile(r"^[0-9]{1,9}(-[0-9]{1,9})?$")
_TAG = re.compile(r"^[A-Za-z0-9_./\-]{1,128}$")
# A SecLang variable with an optional key or /regex/ key; no quotes, spaces or backslashes so the text
# can never end the directive it is placed in.
_TARGET = re.compile(r"^[A-Z_]{2,40}(:[^\s\"'\\,|]{1,200})?$")


@dataclass(frozen=True)
class TargetRef:
    kind: str
    name: str
    namespace: str
    section: str = ""


@dataclass(frozen=True)
class Exclusion:
    rule_ids: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    rule_id: str = ""
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class WafPolicy:
    meta: Meta
    target_refs: tuple[TargetRef, ...]
    mode: str = "Block"
    paranoia_level: int = 1
    inbound_threshold: int = 5
    body_limit: int = 1024 * 1024
    exclusions: tuple[Exclusion, ...] = ()
    custom_rules: tuple[str, ...] = ()
    strict_body: bool = False
    kind: str = "WafPolicy"

    @property
    def blocking(self) -> bool:
        return self.mode == "Block"


def _fields(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise ResourceError(f"{where}: unknown field(s): {', '.join(sorted(unknown))}")


def _int(raw: Any, where: str, lo: int, hi: int, default: int) -> int:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= hi:
        raise ResourceError(f"{where} must be an integer {lo}-{hi}, got {raw!r}")
    return raw


def _strings(raw: Any, where: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ResourceError(f"{where} must be a list")
    out = []
    for item in raw:
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(text, str) or not pattern.match(text):
            raise ResourceError(f"{where}: {item!r} is not {what}")
        out.append(text)
    return tuple(out)


def _target_refs(raw: Any, namespace: str) -> tuple[TargetRef, ...]:
    if not isinstance(raw, list) or not raw:
        raise ResourceError("spec.targetRefs must list at least one Gateway or HTTPRoute")
    out = []
    for i, ref in enumerate(raw):
        where = f"spec.targetRefs[{i}]"
        if not isinstance(ref, dict):
            raise ResourceError(f"{where} must be a mapping")
        _fields(ref, {"group", "kind", "name", "namespace", "sectionName"}, where)
        if ref.get("group", GATEWAY_GROUP) != GATEWAY_GROUP:
            raise ResourceError(f"{where}.group must be {GATEWAY_GROUP}")
        if ref.get("kind") not in TARGET_KINDS:
            raise ResourceError(f"{where}.kind must be one of {', '.join(TARGET_KINDS)}")
        name = ref.get("name")
        if not isinstance(name, str) or not name:
            raise ResourceError(f"{where}.name is required")
        ns = ref.get("namespace", namespace)
        if ns != namespace:  # policy attachment is namespace-local (GEP-713)
            raise ResourceError(f"{where}: a policy can only target objects in its own namespace")
        section = ref.get("sectionName", "")
        if not isinstance(section, str):
            raise ResourceError(f"{where}.sectionName must be a string")
        out.append(TargetRef(ref["kind"], name, namespace, section))
    return tuple(out)


def _exclusions(raw: Any) -> tuple[Exclusion, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ResourceError("spec.exclusions must be a list")
    out = []
    for i, item in enumerate(raw):
        where = f"spec.exclusions[{i}]"
        if not isinstance(item, dict):
            raise ResourceError(f"{where} must be a mapping")
        _fields(item, {"ruleIds", "tags", "ruleId", "targets"}, where)
        rule_id = item.get("ruleId", "")
        rule_id = str(rule_id) if isinstance(rule_id, int) and not isinstance(rule_id, bool) else rule_id
        targets = _strings(item.get("targets"), f"{where}.targets", _TARGET, "a SecLang target (e.g. ARGS:q)")
        if bool(rule_id) != bool(targets):
            raise ResourceError(f"{where}: ruleId and targets go together")
        if rule_id and (not isinstance(rule_id, str) or not rule_id.isdigit()):
            raise ResourceError(f"{where}.ruleId must be a rule id")
        exc = Exclusion(
            _strings(item.get("ruleIds"), f"{where}.ruleIds", _RULE_ID, "a rule id or id range"),
            _strings(item.get("tags"), f"{where}.tags", _TAG, "a rule tag"),
            rule_id,
            targets,
        )
        if not (exc.rule_ids or exc.tags or exc.rule_id):
            raise ResourceError(f"{where}: names no rules (ruleIds, tags, or ruleId + targets)")
        out.append(exc)
    return tuple(out)


@register("WafPolicy", {API_VERSION})
def _parse_wafpolicy(meta: Meta, spec: Mapping[str, Any]) -> WafPolicy:
    _fields(
        spec,
        {
            "targetRefs",
            "mode",
            "paranoiaLevel",
            "inboundAnomalyThreshold",
            "requestBodyLimit",
            "exclusions",
            "customRules",
            "strictBodyParsing",
        },
        "spec",
    )
    mode = spec.get("mode", "Block")
    if mode not in MODES:
        raise ResourceError(f"spec.mode must be one of {', '.join(MODES)}, got {mode!r}")
    custom = spec.get("customRules") or []
    if not isinstance(custom, list) or not all(isinstance(r, str) and r.strip() for r in custom):
        raise ResourceError("spec.customRules must be a list of SecLang rules")
    strict = spec.get("strictBodyParsing", False)
    if not isinstance(strict, bool):
        raise ResourceError("spec.strictBodyParsing must be true or false")
    return WafPolicy(
        meta,
        _target_refs(spec.get("targetRefs"), meta.namespace),
        mode,
        _int(spec.get("paranoiaLevel"), "spec.paranoiaLevel", 1, 4, 1),
        _int(spec.get("inboundAnomalyThreshold"), "spec.inboundAnomalyThreshold", 1, 10_000, 5),
        _int(spec.get("requestBodyLimit"), "spec.requestBodyLimit", 0, 64 * 1024 * 1024, 1024 * 1024),
        _exclusions(spec.get("exclusions")),
        tuple(custom),
        strict,
    )
