"""The Helm chart: lint, template, and the rendered chart on the real API server (server-side dry run)."""

from __future__ import annotations

from pathlib import Path

import yaml

from agent.lab.apiserver import ApiServer
from tests.integration.deploy.conftest import CHART, helm, render
from tests.kube_fixtures import unique
from tests.relay_fixtures import wait_until


def test_helm_lint(root_cert: Path) -> None:
    out = helm("lint", "--strict", str(CHART), "--set-file", f"ca.rootCert={root_cert}")
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_template_needs_the_root_certificate() -> None:
    out = helm("template", "ambit", str(CHART), check=False)
    assert out.returncode != 0 and "ca.rootCert" in out.stderr


def _objects(text: str) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(text) if d}


def test_rendered_agent_and_plane(root_cert: Path) -> None:
    objs = _objects(render("ambit-system", root_cert))
    agent = objs["DaemonSet/ambit-agent"]["spec"]["template"]["spec"]
    container = agent["containers"][0]
    assert container["securityContext"]["privileged"] is True
    assert agent["hostNetwork"] is True and agent["priorityClassName"] == "system-node-critical"
    assert agent["tolerations"] == [{"operator": "Exists"}]
    assert container["readinessProbe"]["httpGet"]["port"] == 15021
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    assert {"/lib/modules", "/usr/src"} <= set(mounts)
    token = next(v for v in agent["volumes"] if v["name"] == "token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "ambit"
    # The agent pod never gets the CA Secret (the kubelet of its node could read it).
    assert not any("secret" in v for v in agent["volumes"])
    plane = objs["Deployment/ambit-mgmt"]["spec"]["template"]["spec"]
    assert next(v for v in plane["volumes"] if v["name"] == "ca")["secret"]["secretName"] == "ambit-ca"
    assert next(v for v in plane["volumes"] if v["name"] == "state")["persistentVolumeClaim"]
    webhook = objs["ValidatingWebhookConfiguration/ambit-validation"]["webhooks"][0]
    assert webhook["clientConfig"]["service"] == {
        "name": "ambit-mgmt",
        "namespace": "ambit-system",
        "path": "/validate",
        "port": 443,
    }


def test_rendered_chart_passes_a_server_side_dry_run(kube_api: ApiServer, root_cert: Path) -> None:
    ns = unique("chart")
    kube_api.kubectl_run("create", "namespace", ns)
    out = kube_api.kubectl_run("apply", "--dry-run=server", "-f", "-", stdin=render(ns, root_cert))
    kinds = [line.split("/")[0] for line in out.stdout.splitlines()]
    assert "daemonset.apps" in kinds and "deployment.apps" in kinds
    assert all(line.endswith("(server dry run)") for line in out.stdout.splitlines())


def test_unprivileged_agent_with_bidirectional_propagation_is_refused(
    kube_api: ApiServer, root_cert: Path
) -> None:
    # Why the chart's agent is privileged: the old deploy/k8s/ambit.yaml had privileged: false.
    ns = unique("chart")
    kube_api.kubectl_run("create", "namespace", ns)
    docs = [d for d in yaml.safe_load_all(render(ns, root_cert)) if d and d["kind"] == "DaemonSet"]
    docs[0]["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"privileged": False}
    out = kube_api.kubectl_run(
        "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(docs[0]), check=False
    )
    assert out.returncode != 0 and "Bidirectional" in out.stderr, out.stderr


def test_cluster_role_grants_what_the_plane_uses_and_nothing_else(
    kube_api: ApiServer, root_cert: Path
) -> None:
    ns = unique("rbac")
    kube_api.kubectl_run("create", "namespace", ns)
    rbac = [d for d in yaml.safe_load_all(render(ns, root_cert)) if d and d["kind"].startswith("ClusterRole")]
    for d in rbac:
        d["metadata"]["name"] = ns  # cluster-scoped: unique per test run on the shared API server
    rbac[1]["roleRef"]["name"] = ns
    kube_api.kubectl_run("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    try:
        user = f"system:serviceaccount:{ns}:ambit-mgmt"

        from kubernetes import client

        authz = client.AuthorizationV1Api(kube_api.client())

        def can(verb: str, resource: str, subresource: str = "") -> bool:
            # A SubjectAccessReview, as the authorizer answers it (no discovery as the impersonated user).
            name, _, group = resource.partition(".")
            attrs = client.V1ResourceAttributes(
                verb=verb, resource=name, group=group, subresource=subresource
            )
            spec = client.V1SubjectAccessReviewSpec(
                user=user, groups=["system:serviceaccounts"], resource_attributes=attrs
            )
            review = authz.create_subject_access_review(client.V1SubjectAccessReview(spec=spec))
            return bool(review.status.allowed)

        # The authorizer sees new roles through its own informer: wait until it has this one.
        assert wait_until(lambda: can("watch", "pods"), 10.0)
        for verb, resource in [
            ("watch", "pods"),
            ("list", "namespaces"),
            ("watch", "services"),
            ("watch", "nodes"),
            ("watch", "endpointslices.discovery.k8s.io"),
            ("watch", "authorizationpolicies.security.istio.io"),
            ("watch", "peerauthentications.security.istio.io"),
            ("watch", "regopolicies.ambit.io"),
            ("watch", "meshconfigs.ambit.io"),
            ("watch", "wafpolicies.ambit.io"),
            ("watch", "servicecidrs.networking.k8s.io"),
            ("watch", "gatewayclasses.gateway.networking.k8s.io"),
            ("watch", "gateways.gateway.networking.k8s.io"),
            ("watch", "httproutes.gateway.networking.k8s.io"),
            ("watch", "referencegrants.gateway.networking.k8s.io"),
            ("watch", "secrets"),
            ("create", "tokenreviews.authentication.k8s.io"),
            ("create", "events"),
        ]:
            assert can(verb, resource), f"cannot {verb} {resource}"
        assert can("patch", "authorizationpolicies.security.istio.io", "status")
        assert can("patch", "regopolicies.ambit.io", "status")
        assert can("patch", "wafpolicies.ambit.io", "status")
        for kind in ("gatewayclasses", "gateways", "httproutes"):
            assert can("patch", f"{kind}.gateway.networking.k8s.io", "status")
            assert not can("patch", f"{kind}.gateway.networking.k8s.io"), kind  # status only
        for verb, resource in [
            ("get", "secrets"),
            ("create", "pods"),
            ("patch", "authorizationpolicies.security.istio.io"),
            ("delete", "regopolicies.ambit.io"),
            ("list", "configmaps"),
            ("create", "secrets"),
            ("delete", "gateways.gateway.networking.k8s.io"),
            ("create", "referencegrants.gateway.networking.k8s.io"),  # read only: users grant, not us
        ]:
            assert not can(verb, resource), f"may {verb} {resource}"
    finally:
        kube_api.kubectl_run("delete", "clusterrole,clusterrolebinding", ns, check=False)


def test_rendered_command_lines_are_what_ambit_accepts(root_cert: Path) -> None:
    # The chart and the CLI evolve apart; argparse is the judge of the flags the chart passes.
    from agent.cli import build_parser

    objs = _objects(render("ambit-system", root_cert))
    plane_args = objs["Deployment/ambit-mgmt"]["spec"]["template"]["spec"]["containers"][0]["args"]
    plane = build_parser().parse_args(plane_args)
    assert plane.source == "kube" and plane.kube_bootstrap == "ambit-system/ambit-agent/ambit-agent"
    assert plane.webhook_dns == "ambit-mgmt.ambit-system.svc" and plane.ca_dir == "/etc/ambit/ca"
    agent_args = objs["DaemonSet/ambit-agent"]["spec"]["template"]["spec"]["containers"][0]["args"]
    agent = build_parser().parse_args([a.replace("$(NODE_NAME)", "node-1") for a in agent_args])
    assert agent.kube_token_file == "/var/run/secrets/ambit/token" and agent.join_token_file is None


def test_cluster_role_reads_exactly_what_the_kube_source_watches(root_cert: Path) -> None:
    from mgmt.kube import source

    watched = {
        (t.group_version.rpartition("/")[0], t.plural)
        for t in (source.NAMESPACES, source.PODS, source.SERVICES, source.ENDPOINT_SLICES, source.NODES)
        + (source.SERVICE_CIDRS, source.REGO_POLICIES, source.MESH_CONFIGS)
        + source.GATEWAY_TYPES
    } | {(source.ISTIO_SECURITY, plural) for _, plural in source.ISTIO_KINDS}
    role = _objects(render("ambit-system", root_cert))["ClusterRole/ambit-mgmt"]
    readable = {
        (group, resource)
        for rule in role["rules"]
        if {"list", "watch"} <= set(rule["verbs"])
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert readable == watched


GATEWAY_VALUES = (
    "gateway.enabled=true",
    "gateway.namespace=edge-ns",
    "gateway.replicas=3",
    "gateway.threads=4",
    "gateway.resources.requests.cpu=4",
    "gateway.service.type=NodePort",
    "gateway.service.ports[0].name=https",
    "gateway.service.ports[0].port=443",
    "gateway.service.ports[0].targetPort=8443",
    "gateway.service.ports[0].nodePort=30443",
)


def test_gateway_is_off_unless_enabled(root_cert: Path) -> None:
    objs = _objects(render("ambit-system", root_cert))
    assert not [k for k in objs if k.startswith(("GatewayClass/", "Deployment/edge"))]


def test_rendered_gateway(root_cert: Path) -> None:
    from mgmt.kube.gateway_status import CONTROLLER_NAME
    from mgmt.kube_bootstrap import AUDIENCE

    objs = _objects(render("ambit-system", root_cert, *GATEWAY_VALUES))
    assert objs["GatewayClass/ambit"]["spec"]["controllerName"] == CONTROLLER_NAME
    # Named <gateway>-<class> in the Gateway's namespace: the account and Deployment the plane admits.
    deploy = objs["Deployment/edge-ambit"]
    assert deploy["metadata"]["namespace"] == "edge-ns" and deploy["spec"]["replicas"] == 3
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "edge-ambit" and pod["automountServiceAccountToken"] is False
    assert objs["ServiceAccount/edge-ambit"]["metadata"]["namespace"] == "edge-ns"
    container = pod["containers"][0]
    assert "--gateway=edge-ns/edge" in container["args"] and "--threads=4" in container["args"]
    assert container["resources"]["requests"]["cpu"] == 4
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    token = next(v for v in pod["volumes"] if v["name"] == "token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == AUDIENCE
    assert not any("secret" in v for v in pod["volumes"])  # certificates come from the plane, in memory
    # The trust bundle is copied into the gateway's namespace (a ConfigMap is namespaced).
    bundles = [
        d
        for d in yaml.safe_load_all(render("ambit-system", root_cert, *GATEWAY_VALUES))
        if d and d["kind"] == "ConfigMap"
    ]
    assert sorted(b["metadata"]["namespace"] for b in bundles) == ["ambit-system", "edge-ns"]
    svc = objs["Service/edge-ambit"]["spec"]
    assert svc["type"] == "NodePort" and svc["ports"][0]["nodePort"] == 30443
    assert svc["selector"] == deploy["spec"]["selector"]["matchLabels"]
    lb = _objects(render("ambit-system", root_cert, "gateway.enabled=true"))["Service/edge-ambit"]["spec"]
    assert lb["type"] == "LoadBalancer" and lb["externalTrafficPolicy"] == "Local"
    assert [(p["port"], p["targetPort"]) for p in lb["ports"]] == [(443, 8443), (80, 8080)]


def test_helm_lint_with_the_gateway(root_cert: Path) -> None:
    out = helm(
        "lint",
        "--strict",
        str(CHART),
        "--set-file",
        f"ca.rootCert={root_cert}",
        "--set",
        "gateway.enabled=true",
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_rendered_gateway_passes_a_server_side_dry_run(kube_crds: ApiServer, root_cert: Path) -> None:
    ns = unique("chart")
    kube_crds.kubectl_run("create", "namespace", ns)
    docs = [
        d
        for d in yaml.safe_load_all(render(ns, root_cert, "gateway.enabled=true", f"gateway.className={ns}"))
        if d and (d["metadata"].get("name", "").startswith("edge-") or d["kind"] == "GatewayClass")
    ]
    assert {d["kind"] for d in docs} == {"GatewayClass", "ServiceAccount", "Deployment", "Service"}
    out = kube_crds.kubectl_run("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(docs))
    assert len(out.stdout.splitlines()) == 4
    assert all(line.endswith("(server dry run)") for line in out.stdout.splitlines())


def test_rendered_gateway_command_line_is_what_ambit_accepts(root_cert: Path) -> None:
    from agent.cli import build_parser

    args = _objects(render("ambit-system", root_cert, "gateway.enabled=true"))["Deployment/edge-ambit"]
    parsed = build_parser().parse_args(args["spec"]["template"]["spec"]["containers"][0]["args"])
    assert parsed.plane == "ambit-mgmt.ambit-system.svc:15012" and parsed.gateway == "ambit-system/edge"
    assert parsed.service_account_token_file == "/var/run/secrets/ambit/token"
