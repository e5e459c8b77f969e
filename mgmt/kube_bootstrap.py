"""Node bootstrap on Kubernetes: the agent pod's ServiceAccount token instead of a hand-made join token.

As istiod does for ztunnel, the plane trusts the API server, not the caller: the agent sends the projected
token the kubelet mounted into its pod (audience `ambit`, bound to that pod). The plane asks the API server
whether it is valid (TokenReview, with the audience), then checks that it names an ambit agent pod running
on the node the agent claims:

- the user is `system:serviceaccount:<ns>:<sa>` of the agent's ServiceAccount;
- the token is bound to a pod (extra `authentication.kubernetes.io/pod-name` and `pod-uid`), and when the
  API server recorded the pod's node (`.../node-name`), it is the claimed node;
- that pod exists now with the same UID (a token of a deleted pod is refused), is not terminating, runs as
  that ServiceAccount, on `spec.nodeName` == the claimed node, and is controlled by the agent DaemonSet.

Only then is `spiffe://<td>/node/<node>` issued. An edge gateway's token is checked the same way against its
Gateway (`verify_gateway`): the user is the Gateway's ServiceAccount in the Gateway's namespace (a token of
another account or namespace is refused), and the pod is controlled, through its ReplicaSet, by the
Gateway's Deployment (mgmt/gateway_scope.py). Any failure to ask the API server is UNAVAILABLE (the agent
retries); every refusal names its kind for the counter and the audit record, never the token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import UsageError

log = logging.getLogger(__name__)

AUDIENCE = "ambit"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
API_TIMEOUT_S = 5.0


class KubeJoinError(Exception):
    """A token that does not admit this node; `kind` is for counters and audit, `retryable` for the API."""

    def __init__(self, kind: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


@dataclass(frozen=True)
class AgentPods:
    """Which pods are ambit agents: `<namespace>/<service account>/<daemonset>` on the command line."""

    namespace: str
    service_account: str
    daemonset: str

    @classmethod
    def parse(cls, text: str) -> AgentPods:
        parts = text.split("/")
        if len(parts) != 3 or not all(parts):
            raise UsageError(f"--kube-bootstrap must be NAMESPACE/SERVICEACCOUNT/DAEMONSET, got {text!r}")
        return cls(*parts)

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@dataclass(frozen=True)
class AgentPod:
    """What the check established (for the audit record)."""

    namespace: str
    name: str
    uid: str
    node: str


def _first(extra: dict[str, list[str]] | None, key: str) -> str:
    values = (extra or {}).get(key) or []
    return values[0] if values else ""


class KubeNodeVerifier:
    def __init__(self, api_client: Any, agents: AgentPods, audience: str = AUDIENCE) -> None:
        from kubernetes import client

        self._auth = client.AuthenticationV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._client = client
        self.agents = agents
        self.audience = audience

    def _review(self, token: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        c = self._client
        body = c.V1TokenReview(spec=c.V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            return self._auth.create_token_review(body, _request_timeout=API_TIMEOUT_S).status
        except ApiException as exc:
            raise KubeJoinError(
                "api_error", f"TokenReview failed: HTTP {exc.status} {exc.reason}", True
            ) from None
        except Exception as exc:  # urllib3 connection errors and timeouts
            raise KubeJoinError(
                "api_unreachable", f"TokenReview failed: {type(exc).__name__}", True
            ) from None

    def _read(self, what: str, call: Callable[[], Any]) -> Any:
        """The object `call` reads, None if it does not exist; any other failure is retryable."""
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeJoinError("api_error", f"reading {what}: HTTP {exc.status}", True) from None
        except Exception as exc:
            raise KubeJoinError("api_unreachable", f"reading {what}: {type(exc).__name__}", True) from None

    def _pod(self, namespace: str, name: str) -> Any:
        pod = self._read(
            f"pod {namespace}/{name}",
            lambda: self._core.read_namespaced_pod(name, namespace, _request_timeout=API_TIMEOUT_S),
        )
        if pod is None:
            raise KubeJoinError("pod_gone", f"the token's pod {namespace}/{name} does not exist")
        return pod

    def _reviewed(self, token: str, username: str) -> tuple[str, str, str]:
        """(pod name, pod UID, node name or "") of a valid, pod-bound token of `username`."""
        status = self._review(token)
        if not status.authenticated:
            raise KubeJoinError(
                "token_invalid", f"the API server did not authenticate the token: {status.error or 'invalid'}"
            )
        if self.audience not in (status.audiences or []):
            raise KubeJoinError("wrong_audience", f"the token is not for audience {self.audience!r}")
        user = status.user
        if user.username != username:
            raise KubeJoinError("wrong_service_account", f"token of {user.username}, not of {username}")
        pod_name, pod_uid = _first(user.extra, EXTRA_POD_NAME), _first(user.extra, EXTRA_POD_UID)
        if not pod_name or not pod_uid:
            raise KubeJoinError("not_pod_bound", "the token is not bound to a pod (use the projected token)")
        return pod_name, pod_uid, _first(user.extra, EXTRA_NODE_NAME)

    def _live_pod(self, namespace: str, name: str, uid: str, service_account: str) -> Any:
        """The token's pod as it is now: the same UID, not terminating, running as `service_account`."""
        pod = self._pod(namespace, name)
        where = f"pod {namespace}/{name}"
        if pod.metadata.uid != uid:
            raise KubeJoinError(
                "pod_replaced", f"{where} is not the pod the token was bound to (UID differs)"
            )
        if pod.metadata.deletion_timestamp is not None:
            raise KubeJoinError("pod_terminating", f"{where} is being deleted")
        if pod.spec.service_account_name != service_account:
            raise KubeJoinError("wrong_service_account", f"{where} runs as {pod.spec.service_account_name}")
        return pod

    def verify(self, token: str, node: str) -> AgentPod:
        """The agent pod `token` proves, if it is one of ours on `node`; KubeJoinError otherwise."""
        pod_name, pod_uid, token_node = self._reviewed(token, self.agents.username)
        if token_node and token_node != node:
            raise KubeJoinError(
                "wrong_node", f"the token was issued to a pod on node {token_node}, not {node}"
            )
        pod = self._live_pod(self.agents.namespace, pod_name, pod_uid, self.agents.service_account)
        where = f"pod {self.agents.namespace}/{pod_name}"
        if pod.spec.node_name != node:
            raise KubeJoinError(
                "wrong_node", f"{where} runs on node {pod.spec.node_name or '(none)'}, not {node}"
            )
        if not any(
            o.kind == "DaemonSet" and o.api_version == "apps/v1" and o.name == self.agents.daemonset
            for o in _controllers(pod)
        ):
            raise KubeJoinError(
                "not_agent_pod", f"{where} is not controlled by DaemonSet {self.agents.daemonset}"
            )
        return AgentPod(self.agents.namespace, pod_name, pod_uid, node)

    def verify_gateway(self, token: str, namespace: str, service_account: str, deployment: str) -> AgentPod:
        """The gateway pod `token` proves: ServiceAccount `service_account` of `namespace`, in a pod whose
        ReplicaSet is controlled by Deployment `deployment` of that namespace; KubeJoinError otherwise."""
        username = f"system:serviceaccount:{namespace}:{service_account}"
        pod_name, pod_uid, _ = self._reviewed(token, username)
        pod = self._live_pod(namespace, pod_name, pod_uid, service_account)
        where = f"pod {namespace}/{pod_name}"
        replica_sets = [o for o in _controllers(pod) if o.kind == "ReplicaSet" and o.api_version == "apps/v1"]
        owner = self._deployment_of(namespace, replica_sets[0].name) if replica_sets else ""
        if owner != deployment:
            raise KubeJoinError("not_gateway_pod", f"{where} is not controlled by Deployment {deployment}")
        return AgentPod(namespace, pod_name, pod_uid, pod.spec.node_name or "")

    def _deployment_of(self, namespace: str, replica_set: str) -> str:
        rs = self._read(
            f"ReplicaSet {namespace}/{replica_set}",
            lambda: self._apps.read_namespaced_replica_set(
                replica_set, namespace, _request_timeout=API_TIMEOUT_S
            ),
        )
        deployments = (
            [o for o in _controllers(rs) if o.kind == "Deployment" and o.api_version == "apps/v1"]
            if rs is not None
            else []
        )
        return str(deployments[0].name) if deployments else ""


def _controllers(obj: Any) -> list[Any]:
    return [o for o in obj.metadata.owner_references or [] if o.controller]
