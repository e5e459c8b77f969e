"""The CRDs on the real API server: Istio and ambit objects apply, typos are refused at apply time."""

from __future__ import annotations

import pytest

from agent.lab.apiserver import ApiServer
from tests.kube_fixtures import unique

GOOD = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: good, namespace: {ns}}}
spec:
  action: DENY
  selector: {{matchLabels: {{app: web}}}}
  rules:
    - from: [{{source: {{principals: ["cluster.local/ns/a/sa/b"], ipBlocks: ["10.0.0.0/8", "fd00::/8"]}}}}]
      to: [{{operation: {{ports: ["8080", 443]}}}}]
      when: [{{key: source.ip, values: ["10.1.2.3"]}}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: old-api, namespace: {ns}}}
spec: {{action: ALLOW}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: good, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls: {{"8080": {{mode: PERMISSIVE}}}}
---
apiVersion: ambit.io/v1
kind: RegoPolicy
metadata: {{name: good, namespace: {ns}}}
spec: {{module: "package ambit\\ndefault authz := true"}}
---
apiVersion: ambit.io/v1
kind: WafPolicy
metadata: {{name: good, namespace: {ns}}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: shop}}]
  mode: DetectOnly
  paranoiaLevel: 2
  inboundAnomalyThreshold: 7
  requestBodyLimit: 65536
  exclusions:
    - {{ruleIds: ["942100", "920000-920999"]}}
    - {{tags: [attack-sqli]}}
    - {{ruleId: "942100", targets: ["ARGS:q", "REQUEST_COOKIES:/^sess/"]}}
  customRules: ['SecRule ARGS:debug "@streq 1" "id:10001,phase:1,deny,status:403"']
"""


def test_valid_objects_apply_in_every_served_version(kube_crds: ApiServer) -> None:
    ns = unique("crd")
    kube_crds.kubectl_run("create", "namespace", ns)
    out = kube_crds.kubectl_run("apply", "-f", "-", stdin=GOOD.format(ns=ns))
    assert out.stdout.count(" created") == 5, out.stdout
    # v1 and v1beta1 are one stored object; the query default comes from the schema.
    got = kube_crds.kubectl_run("get", "authorizationpolicies.v1.security.istio.io", "-n", ns, "-o", "name")
    assert sorted(got.stdout.split()) == [
        "authorizationpolicy.security.istio.io/good",
        "authorizationpolicy.security.istio.io/old-api",
    ]
    query = kube_crds.kubectl_run("get", "rp", "good", "-n", ns, "-o", "jsonpath={.spec.query}")
    assert query.stdout == "data.ambit.authz"
    mesh = (
        "apiVersion: ambit.io/v1\nkind: MeshConfig\nmetadata: {name: " + ns + "}\nspec: {defaultDeny: true}\n"
    )
    kube_crds.kubectl_run("apply", "-f", "-", stdin=mesh)
    kube_crds.kubectl_run("delete", "meshconfig", ns)


BAD = "metadata: {{name: bad, namespace: {ns}}}\n"
AP = "apiVersion: security.istio.io/{version}\nkind: AuthorizationPolicy\n" + BAD
PA = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n" + BAD
RP = "apiVersion: ambit.io/v1\nkind: RegoPolicy\n" + BAD
MC = "apiVersion: ambit.io/v1\nkind: MeshConfig\nmetadata: {{name: bad}}\n"
WP = (
    "apiVersion: ambit.io/v1\nkind: WafPolicy\n"
    + BAD
    + "spec:\n  targetRefs: [{{kind: Gateway, name: edge}}]\n"
)


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        (AP + "spec: {{action: DENNY}}", 'Unsupported value: "DENNY"'),
        (AP + "spec: {{actoin: DENY}}", 'unknown field "spec.actoin"'),
        (AP + "spec: {{rules: [{{to: [{{operation: {{ports: ['70000']}}}}]}}]}}", "ports[0]"),
        (AP + "spec: {{rules: [{{to: [{{operation: {{ports: [0]}}}}]}}]}}", "greater than or equal to 1"),
        (AP + "spec: {{rules: [{{to: [{{operation: {{ports: [http]}}}}]}}]}}", "ports[0]"),
        (AP + "spec: {{rules: [{{from: [{{source: {{ipBlocks: [not-an-ip]}}}}]}}]}}", "ipBlocks[0]"),
        (
            AP + "spec: {{rules: [{{from: [{{source: {{principal: [a]}}}}]}}]}}",
            'unknown field "spec.rules[0].from[0].source.principal"',
        ),
        (AP + "spec: {{rules: [{{when: [{{values: [a]}}]}}]}}", "key: Required value"),
        (PA + "spec: {{mtls: {{mode: STICT}}}}", 'Unsupported value: "STICT"'),
        (
            PA
            + "spec: {{selector: {{matchLabels: {{a: b}}}}, portLevelMtls: {{'99999': {{mode: STRICT}}}}}}",
            "port numbers",
        ),
        (PA + "spec: {{portLevelMtls: {{'80': {{mode: STRICT}}}}}}", "portLevelMtls requires selector"),
        (
            RP + "spec: {{query: data.x}}",
            "spec.module: Required value",
        ),
        (
            RP + "spec: {{module: x, query: 'data.x; true'}}",
            "spec.query",
        ),
        (
            MC + "spec: {{defaultMtlsMode: strict}}",
            "strict",
        ),
        (
            MC + "spec: {{rootNamespace: Ambit_System}}",
            "rootNamespace",
        ),
        (WP + "  mode: Blocking\n", 'Unsupported value: "Blocking"'),
        (WP + "  paranoiaLevel: 5\n", "paranoiaLevel"),
        (WP + "  exclusions: [{{ruleIds: [94210x]}}]\n", "ruleIds[0]"),
        (WP + "  exclusions: [{{ruleId: '942100'}}]\n", "ruleId and targets go together"),
        (WP + "  exclusions: [{{ruleId: '942100', targets: ['ARGS:a\"b']}}]\n", "targets[0]"),
        (WP + "  paranoia: 2\n", 'unknown field "spec.paranoia"'),
        (
            "apiVersion: ambit.io/v1\nkind: WafPolicy\n"
            + BAD
            + "spec: {{targetRefs: [{{kind: Service, name: x}}]}}",
            'Unsupported value: "Service"',
        ),
    ],
)
def test_typos_are_refused_at_apply_time(kube_crds: ApiServer, doc: str, error: str) -> None:
    ns = unique("crd")
    kube_crds.kubectl_run("create", "namespace", ns)
    for version in ("v1", "v1beta1") if "{version}" in doc else ("v1",):
        out = kube_crds.kubectl_run("apply", "-f", "-", stdin=doc.format(ns=ns, version=version), check=False)
        assert out.returncode != 0, f"{version}: accepted:\n{doc}"
        assert error in out.stderr, out.stderr
