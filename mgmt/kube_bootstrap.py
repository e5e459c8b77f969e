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

Only then is `spiffe://<td>/node/<node>` issued. Any failure to ask the API server is UNAVAILABLE (the agent
retries); every refusal names its kind for the counter and the audit record, never the token.
"""

from __future__ import annotations

import logging
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

    def _pod(self, namespace: str, name: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._core.read_namespaced_pod(name, namespace, _request_timeout=API_TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 404:
                raise KubeJoinError(
                    "pod_gone", f"the token's pod {namespace}/{name} does not exist"
                ) from None
            raise KubeJoinError(
                "api_error", f"reading pod {namespace}/{name}: HTTP {exc.status}", True
            ) from None
        except Exception as exc:
            raise KubeJoinError(
                "api_unreachable", f"reading pod {namespace}/{name}: {type(exc).__name__}", True
            ) from None

    def verify(self, token: str, node: str) -> AgentPod:
        """The agent pod `token` proves, if it is one of ours on `node`; KubeJoinError otherwise."""
        status = self._review(token)
        if not status.authenticated:
            raise KubeJoinError(
                "token_invalid", f"the API server did not authenticate the token: {status.error or 'invalid'}"
            )
        if self.audience not in (status.audiences or []):
            raise KubeJoinError("wrong_audience", f"the token is not for audience {self.audience!r}")
        user = status.user
        if user.username != self.agents.username:
            raise KubeJoinError(
                "wrong_service_account", f"token of {user.username}, not of {self.agents.username}"
            )
        pod_name, pod_uid = _first(user.extra, EXTRA_POD_NAME), _first(user.extra, EXTRA_POD_UID)
        if not pod_name or not pod_uid:
            raise KubeJoinError("not_pod_bound", "the token is not bound to a pod (use the projected token)")
        token_node = _first(user.extra, EXTRA_NODE_NAME)
        if token_node and token_node != node:
            raise KubeJoinError(
                "wrong_node", f"the token was issued to a pod on node {token_node}, not {node}"
            )
        pod = self._pod(self.agents.namespace, pod_name)
        where = f"pod {self.agents.namespace}/{pod_name}"
        if pod.metadata.uid != pod_uid:
            raise KubeJoinError(
                "pod_replaced", f"{where} is not the pod the token was bound to (UID differs)"
            )
        if pod.metadata.deletion_timestamp is not None:
            raise KubeJoinError("pod_terminating", f"{where} is being deleted")
        if pod.spec.service_account_name != self.agents.service_account:
            raise KubeJoinError("wrong_service_account", f"{where} runs as {pod.spec.service_account_name}")
        if pod.spec.node_name != node:
            raise KubeJoinError(
                "wrong_node", f"{where} runs on node {pod.spec.node_name or '(none)'}, not {node}"
            )
        owners = [o for o in pod.metadata.owner_references or [] if o.controller]
        if not any(
            o.kind == "DaemonSet" and o.api_version == "apps/v1" and o.name == self.agents.daemonset
            for o in owners
        ):
            raise KubeJoinError(
                "not_agent_pod", f"{where} is not controlled by DaemonSet {self.agents.daemonset}"
            )
        return AgentPod(self.agents.namespace, pod_name, pod_uid, node)
