"""The WAF core through libmodsecurity + CRS 3.3.4 (real rule sets, no data path): the vendored corpus rows
get the oracle's verdict, exclusions take effect, and bad policies are refused with the reason."""

from __future__ import annotations

import pytest

from api.resources import Meta, ResourceError, parse
from api.resources.wafpolicy import Exclusion, TargetRef, WafPolicy
from gateway.dataplane import WAF_BLOCK, WAF_DETECT, WafRules
from gateway.waf import RuleSetCache, WafConfigError, rules_text
from tests.gateway_corpus import SAMPLE, load_rows, raw_request

SQLI = "/search?q=1%27%20OR%201=1--"
HEADERS = [("Host", "shop.example"), ("User-Agent", "curl/8.0"), ("Accept", "*/*")]


def policy(**kw: object) -> WafPolicy:
    return WafPolicy(Meta("p", "default"), (TargetRef("HTTPRoute", "r", "default"),), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cache() -> RuleSetCache:
    return RuleSetCache()


def check(rules: WafRules, uri: str, mode: int = WAF_BLOCK, headers: list[tuple[str, str]] | None = None):  # type: ignore[no-untyped-def]
    return rules.check(mode, "GET", uri, "1.1", headers or HEADERS)


def test_vendored_rows_get_the_oracle_verdict_and_rules(cache: RuleSetCache) -> None:
    """Not only block/pass: the very CRS rules that fired in the oracle (libmodsecurity + CRS 3.3.4, PL1)."""
    rules = cache.compile(policy())
    wrong = []
    for row in load_rows(SAMPLE):
        head, _, body = raw_request(row).partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        method, uri, version = lines[0].split(" ", 2)
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        verdict = rules.check(WAF_BLOCK, method, uri, version.split("/")[1], headers, body)  # type: ignore[arg-type]
        fired = sorted({r.rule_id for r in verdict.rules} - {"949110"})
        if (verdict.action == "blocked") != (row["expect"] == "block") or fired != sorted(
            row["oracle_rules"]
        ):
            wrong.append((row["id"], verdict.action, fired, row["oracle_rules"]))
    assert not wrong


def test_block_reports_rules_messages_and_anomaly_score(cache: RuleSetCache) -> None:
    verdict = check(cache.compile(policy()), SQLI)
    assert verdict.action == "blocked" and verdict.status == 403
    ids = [r.rule_id for r in verdict.rules]
    assert "942100" in ids and "949110" in ids
    assert verdict.score >= 5
    assert any("SQL Injection" in r.message for r in verdict.rules)


def test_detect_only_matches_but_does_not_block(cache: RuleSetCache) -> None:
    verdict = check(cache.compile(policy(mode="DetectOnly")), SQLI, WAF_DETECT)
    assert verdict.action == "detected" and verdict.status == 0
    assert "949110" in [r.rule_id for r in verdict.rules]


def test_clean_request_passes(cache: RuleSetCache) -> None:
    verdict = check(cache.compile(policy()), "/search?q=shoes")
    assert verdict.action == "allowed" and verdict.score == 0 and not verdict.rules


def test_exclusion_by_rule_id(cache: RuleSetCache) -> None:
    rules = cache.compile(policy(exclusions=(Exclusion(rule_ids=("942100",)),)))
    assert "942100" not in [r.rule_id for r in check(rules, SQLI).rules]


def test_exclusion_by_tag(cache: RuleSetCache) -> None:
    rules = cache.compile(policy(exclusions=(Exclusion(tags=("attack-sqli",)),)))
    assert check(rules, SQLI).action == "allowed"


def test_exclusion_of_a_target_spares_only_that_argument(cache: RuleSetCache) -> None:
    rules = cache.compile(policy(exclusions=(Exclusion(rule_id="942100", targets=("ARGS:q",)),)))
    assert "942100" not in [r.rule_id for r in check(rules, SQLI).rules]
    other = check(rules, SQLI.replace("q=", "other="))
    assert other.action == "blocked" and "942100" in [r.rule_id for r in other.rules]


def test_paranoia_level_2_catches_what_level_1_lets_through(cache: RuleSetCache) -> None:
    # 920300 (missing Accept header) only runs from paranoia level 2
    headers = [("Host", "shop.example"), ("User-Agent", "curl/8.0")]
    assert check(cache.compile(policy()), "/", headers=headers).rules == ()
    pl2 = check(cache.compile(policy(paranoia_level=2)), "/", headers=headers)
    assert "920300" in [r.rule_id for r in pl2.rules]


def test_threshold_decides(cache: RuleSetCache) -> None:
    assert check(cache.compile(policy(inbound_threshold=1000)), SQLI).action == "allowed"


def test_custom_rule_blocks(cache: RuleSetCache) -> None:
    rule = 'SecRule ARGS:debug "@streq 1" "id:10001,phase:1,deny,status:403,log,msg:\'debug switch\'"'
    rules = cache.compile(policy(custom_rules=(rule,)))
    verdict = check(rules, "/?debug=1")
    assert verdict.action == "blocked" and [r.rule_id for r in verdict.rules] == ["10001"]


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"exclusions": (Exclusion(rule_ids=("123",)),)}, "matches no CRS or custom rule"),
        ({"exclusions": (Exclusion(tags=("attack-nothing",)),)}, "is on no CRS rule"),
        ({"exclusions": (Exclusion(rule_id="942100", targets=("NOSUCHVAR:x",)),)}, "rules refused"),
        ({"custom_rules": ('SecRule ARGS "@rx (" "id:10002,phase:1,deny"',)}, "rules refused"),
        ({"custom_rules": ("SecRuleEngine Off",)}, "is not allowed"),
        ({"custom_rules": ("Include /etc/passwd",)}, "is not allowed"),
        ({"custom_rules": ('SecRule ARGS "@rx a" "id:942100,phase:1,deny"',)}, "rules refused"),
    ],
)
def test_bad_policies_are_refused_with_the_reason(
    cache: RuleSetCache, kw: dict[str, object], reason: str
) -> None:
    with pytest.raises(WafConfigError, match=reason):
        cache.compile(policy(**kw))


def test_identical_policies_share_one_rule_set(cache: RuleSetCache) -> None:
    assert cache.compile(policy()) is cache.compile(policy())
    assert rules_text(policy()) != rules_text(policy(paranoia_level=3))


def test_wafpolicy_resource_parses_and_rejects_bad_fields() -> None:
    doc = {
        "apiVersion": "ambit.io/v1",
        "kind": "WafPolicy",
        "metadata": {"name": "w"},
        "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}],
            "mode": "DetectOnly",
            "paranoiaLevel": 2,
            "exclusions": [{"ruleIds": [942100, "920000-920999"]}, {"ruleId": 942100, "targets": ["ARGS:q"]}],
        },
    }
    pol = parse(doc)
    assert pol.mode == "DetectOnly" and pol.paranoia_level == 2 and not pol.blocking
    assert pol.exclusions[0].rule_ids == ("942100", "920000-920999")
    for bad in (
        {"paranoiaLevel": 5},
        {"mode": "Panic"},
        {"exclusions": [{"ruleId": "1", "targets": ['ARGS:"x']}]},
        {"targetRefs": [{"kind": "Service", "name": "s"}]},
        {"surprise": 1},
    ):
        broken = {**doc, "spec": {**doc["spec"], **bad}}
        with pytest.raises(ResourceError):
            parse(broken)
