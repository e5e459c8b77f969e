"""WAF rule sets: a WafPolicy turned into libmodsecurity SecLang (engine settings, a generated crs-setup,
the OWASP CRS 3.3.4 request rules from Debian's modsecurity-crs, the policy's exclusions), compiled once per
distinct text and shared by every route that uses it.

Exclusions are checked against the CRS actually installed (rule ids and tags are read from its files), so a
typo is refused at config time with the reason instead of silently excluding nothing; custom rules and
target updates are compiled by libmodsecurity, whose parser error is the reason given.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from api.resources.wafpolicy import Exclusion, WafPolicy
from gateway.dataplane import DataplaneError, WafRules

CRS_RULES_DIR = Path("/usr/share/modsecurity-crs/rules")
CRS_SETUP_VERSION = 334
# Our own rule ids: 9990000-9990999 (outside CRS's 900000-999999 allocations that 3.3.4 uses).
SCORE_RULE_ID = 9990001
_ALLOWED_CUSTOM = ("SecRule", "SecAction", "SecMarker")
_CONTINUED = re.compile(r"\\\s*\n")


class WafConfigError(ValueError):
    """A WafPolicy that cannot become a rule set: the reason names the policy and the bad part."""


@dataclass(frozen=True)
class CrsCatalogue:
    rule_ids: frozenset[int]
    tags: frozenset[str]


@functools.cache
def crs_catalogue(rules_dir: Path = CRS_RULES_DIR) -> CrsCatalogue:
    ids: set[int] = set()
    tags: set[str] = set()
    for conf in sorted(rules_dir.glob("*.conf")):
        text = conf.read_text(encoding="utf-8", errors="replace")
        ids.update(int(m) for m in re.findall(r"\bid:(\d+)", text))
        tags.update(re.findall(r"\btag:'([^']+)'", text))
    if not ids:
        raise WafConfigError(f"no CRS rules under {rules_dir} (is modsecurity-crs installed?)")
    return CrsCatalogue(frozenset(ids), frozenset(tags))


def _base(blocking: bool, body_limit: int) -> str:
    # What modsecurity.conf-recommended sets for request inspection, with our body limit, and its body
    # processors for XML/JSON (200000/200001). Not its SecPcreMatchLimit: in libmodsecurity 3.0.9 setting
    # it costs ~40% of CRS's time per request (measured: 1.6 vs 0.96 ms for a plain GET at PL1), and
    # CRS 3.3.4's expressions are written to be linear.
    limit = max(body_limit, 1)
    return f"""SecRuleEngine {"On" if blocking else "DetectionOnly"}
SecRequestBodyAccess On
SecRequestBodyLimit {limit}
SecRequestBodyNoFilesLimit {limit}
SecRequestBodyLimitAction Reject
SecResponseBodyAccess Off
SecArgumentSeparator &
SecCookieFormat 0
SecAuditEngine Off
SecStatusEngine Off
SecRule REQUEST_HEADERS:Content-Type "(?:application(?:/soap\\+|/)|text/)xml" \\
  "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "application/json" \\
  "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
"""


# modsecurity.conf-recommended's body error rules, opt-in (WafPolicy strictBodyParsing): CRS 3.3.4 does
# not ship them, and with them a body its parsers reject (LF-only multipart, a non-JSON body labelled
# JSON) is refused even when nothing in it is an attack.
_STRICT_BODY = """SecRule REQBODY_ERROR "!@eq 0" \\
  "id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body.'"
SecRule MULTIPART_STRICT_ERROR "!@eq 0" \\
  "id:200003,phase:2,t:none,log,deny,status:400,msg:'Multipart request body failed strict validation'"
"""


def _crs_setup(paranoia: int, threshold: int) -> str:
    # crs-setup.conf for anomaly scoring: actions pass and log in phases 1/2; REQUEST-949 blocks once the
    # inbound score reaches the threshold.
    return f"""SecDefaultAction "phase:1,log,auditlog,pass"
SecDefaultAction "phase:2,log,auditlog,pass"
SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={paranoia}"
SecAction "id:900110,phase:1,nolog,pass,t:none,setvar:tx.inbound_anomaly_score_threshold={threshold},\\
setvar:tx.outbound_anomaly_score_threshold=4"
SecAction "id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version={CRS_SETUP_VERSION}"
"""


# Reports the inbound score just before REQUEST-949 sums and evaluates it: CRS 3.3.4 keeps one sum per
# paranoia level (TX:ANOMALY_SCORE_PL1..4, added up by 949060-949063 right before 949110 may deny), and the
# C API cannot read variables, so the message carries the four and the C side adds them up.
_SCORE_RULE = (
    f'SecRule TX:/^ANOMALY_SCORE_PL[1-4]$/ "@gt 0" "id:{SCORE_RULE_ID},phase:2,pass,log,t:none,'
    "msg:'ambit inbound anomaly score %{TX.ANOMALY_SCORE_PL1} %{TX.ANOMALY_SCORE_PL2} "
    "%{TX.ANOMALY_SCORE_PL3} %{TX.ANOMALY_SCORE_PL4}'\"\n"
)


def _check_custom(policy: str, rule: str) -> str:
    text = _CONTINUED.sub(" ", rule).strip()
    for line in text.splitlines():
        directive = line.split(None, 1)[0] if line.strip() else ""
        if directive and not directive.startswith("#") and directive not in _ALLOWED_CUSTOM:
            raise WafConfigError(
                f"WafPolicy {policy}: custom rule directive {directive!r} is not allowed "
                f"(only {', '.join(_ALLOWED_CUSTOM)}: engine settings and files belong to the gateway)"
            )
    return text


def _range_ok(spec: str, ids: frozenset[int]) -> bool:
    lo, _, hi = spec.partition("-")
    if not hi:
        return int(lo) in ids
    return int(lo) <= int(hi) and any(int(lo) <= i <= int(hi) for i in ids)


def _exclusion_lines(policy: str, exc: Exclusion, cat: CrsCatalogue, custom_ids: set[int]) -> list[str]:
    known = cat.rule_ids | custom_ids
    lines = []
    for spec in exc.rule_ids:
        if not _range_ok(spec, known):
            raise WafConfigError(
                f"WafPolicy {policy}: exclusion rule id {spec} matches no CRS or custom rule"
            )
        lines.append(f"SecRuleRemoveById {spec}")
    for tag in exc.tags:
        if tag not in cat.tags:
            raise WafConfigError(f"WafPolicy {policy}: exclusion tag {tag!r} is on no CRS rule")
        lines.append(f'SecRuleRemoveByTag "{tag}"')
    if exc.rule_id:
        if int(exc.rule_id) not in known:
            raise WafConfigError(f"WafPolicy {policy}: target exclusion rule id {exc.rule_id} is no CRS rule")
        for target in exc.targets:
            lines.append(f'SecRuleUpdateTargetById {exc.rule_id} "!{target}"')
    return lines


def rules_text(policy: WafPolicy, rules_dir: Path = CRS_RULES_DIR) -> str:
    """The whole SecLang text of `policy`. Raises WafConfigError on exclusions that name nothing."""
    name = f"{policy.meta.namespace}/{policy.meta.name}"
    cat = crs_catalogue(rules_dir)
    custom = [_check_custom(name, r) for r in policy.custom_rules]
    custom_ids = {int(m) for r in custom for m in re.findall(r"\bid:(\d+)", r)}
    parts = [
        _base(policy.blocking, policy.body_limit),
        _STRICT_BODY if policy.strict_body else "",
        _crs_setup(policy.paranoia_level, policy.inbound_threshold),
    ]
    parts.extend(r + "\n" for r in custom)
    # Only the request rules: the gateway does not inspect responses.
    for conf in sorted(rules_dir.glob("REQUEST-*.conf")):
        if conf.name.startswith("REQUEST-949"):
            parts.append(_SCORE_RULE)
        parts.append(f"Include {conf}\n")
    for exc in policy.exclusions:
        parts.extend(line + "\n" for line in _exclusion_lines(name, exc, cat, custom_ids))
    return "".join(parts)


class RuleSetCache:
    """Compiled rule sets by text: identical policies share one (CRS costs ~MBs and ~100 ms to load)."""

    def __init__(self) -> None:
        self._sets: dict[str, WafRules] = {}

    def compile(self, policy: WafPolicy) -> WafRules:
        text = rules_text(policy)
        if text not in self._sets:
            try:
                self._sets[text] = WafRules(text)
            except DataplaneError as exc:
                raise WafConfigError(
                    f"WafPolicy {policy.meta.namespace}/{policy.meta.name}: rules refused: {exc}"
                ) from None
        return self._sets[text]

    def retain_only(self, used: set[int]) -> None:
        """Drops rule sets no live config uses (ids of the WafRules objects to keep)."""
        self._sets = {t: w for t, w in self._sets.items() if id(w) in used}
