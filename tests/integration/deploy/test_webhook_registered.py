"""The webhook registered with the real API server: `kubectl apply` of what OpenAPI cannot catch fails."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator

import pytest
import yaml

from agent.lab.apiserver import ApiServer
from mgmt.ca import CertificateAuthority
from mgmt.webhook import WebhookServer
from tests.kube_fixtures import unique
from tests.relay_fixtures import wait_until

META = "metadata: {{name: {name}, namespace: {ns}}}\n"
REGO = "apiVersion: ambit.io/v1\nkind: RegoPolicy\n" + META + "spec: {{module: {module}}}\n"
AP = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n" + META + "spec: {spec}\n"


@pytest.fixture
def registered(kube_crds: ApiServer) -> Iterator[tuple[ApiServer, str, WebhookServer]]:
    ca = CertificateAuthority.generate_root("cluster.local")
    # The API server dials the URL's host name and checks it against the certificate and caBundle.
    server = WebhookServer(ca, "cluster.local", "127.0.0.1:0", ("localhost",))
    server.start()
    ns = unique("admission")
    kube_crds.kubectl_run("create", "namespace", ns)
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": ns},
        "webhooks": [
            {
                "name": "validation.ambit.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "clientConfig": {
                    "url": f"https://localhost:{server.port}/validate",
                    "caBundle": base64.b64encode(ca.bundle_pem()).decode(),
                },
                # Only this test's namespace: the API server is shared by the whole session.
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "rules": [
                    {
                        "apiGroups": ["security.istio.io"],
                        "apiVersions": ["v1", "v1beta1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["authorizationpolicies", "peerauthentications"],
                    },
                    {
                        "apiGroups": ["ambit.io"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["regopolicies", "wafpolicies"],
                    },
                ],
            }
        ],
    }
    kube_crds.kubectl_run("apply", "-f", "-", stdin=yaml.safe_dump(config))
    try:
        yield kube_crds, ns, server
    finally:
        kube_crds.kubectl_run("delete", "validatingwebhookconfiguration", ns, check=False)
        server.stop()


def _first_refusal(api: ApiServer, doc: str) -> subprocess.CompletedProcess[str]:
    """`kubectl apply` of `doc`, retried until refused: the API server picks a new webhook configuration
    up through its informer."""
    refused: list[subprocess.CompletedProcess[str]] = []

    def called() -> bool:
        refused.append(api.kubectl_run("apply", "-f", "-", stdin=doc, check=False))
        return refused[-1].returncode != 0

    assert wait_until(called, 15.0)
    return refused[-1]


def test_kubectl_apply_goes_through_the_webhook(registered: tuple[ApiServer, str, WebhookServer]) -> None:
    api, ns, server = registered
    broken = REGO.format(name="broken", ns=ns, module=json.dumps("package ambit\nauthz := input.x +"))
    refused = _first_refusal(api, broken)
    assert 'admission webhook "validation.ambit.io" denied the request' in refused.stderr
    assert "module does not compile" in refused.stderr

    bad_principal = AP.format(
        name="p", ns=ns, spec='{rules: [{from: [{source: {principals: ["cluster.local/ns/x"]}}]}]}'
    )
    out = api.kubectl_run("apply", "-f", "-", stdin=bad_principal, check=False)
    assert out.returncode != 0 and "<trust-domain>/ns/<namespace>/sa/<service-account>" in out.stderr

    good = REGO.format(name="good", ns=ns, module=json.dumps("package ambit\ndefault authz := true"))
    assert "created" in api.kubectl_run("apply", "-f", "-", stdin=good).stdout
    l7 = AP.format(name="l7", ns=ns, spec="{rules: [{to: [{operation: {methods: [GET]}}]}]}")
    out = api.kubectl_run("apply", "-f", "-", stdin=l7)
    assert "created" in out.stdout and "Warning:" in out.stderr  # what the node enforces differently
    counts = server.counters()
    assert counts["rejected"] >= 2 and counts["allowed"] == 2


WAF = (
    "apiVersion: ambit.io/v1\nkind: WafPolicy\n"
    + META
    + "spec: {{targetRefs: [{{kind: Gateway, name: edge}}], exclusions: [{exclusion}]}}\n"
)


def test_a_waf_policy_the_gateway_would_refuse_is_refused_at_apply(
    registered: tuple[ApiServer, str, WebhookServer],
) -> None:
    api, ns, server = registered
    # Legal to the schema, but the CRS 3.3.4 has no rule 999999 nor tag attack-sqlx: it would exclude nothing.
    typo = WAF.format(name="typo", ns=ns, exclusion="{ruleIds: ['999999']}")
    refused = _first_refusal(api, typo)
    assert "exclusion rule id 999999 matches no CRS or custom rule" in refused.stderr
    tag = WAF.format(name="tag", ns=ns, exclusion="{tags: [attack-sqlx]}")
    out = api.kubectl_run("apply", "-f", "-", stdin=tag, check=False)
    assert out.returncode != 0 and "'attack-sqlx' is on no CRS rule" in out.stderr
    good = WAF.format(name="good", ns=ns, exclusion="{ruleIds: ['942100'], tags: [attack-sqli]}")
    assert "created" in api.kubectl_run("apply", "-f", "-", stdin=good).stdout
    assert server.counters()["rejected_WafPolicy"] >= 2
