"""An authenticated API client for the plane: a kubeconfig when given, else in-cluster, else the default."""

from __future__ import annotations

import os
from typing import Any

from agent.errors import UsageError


def api_client(kubeconfig: str | None = None) -> Any:
    """`kubernetes.client.ApiClient` from `kubeconfig`, the pod's ServiceAccount (in a cluster), or
    $KUBECONFIG / ~/.kube/config. In-cluster credentials are the projected token, which the client
    re-reads as the kubelet rotates it."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(client_configuration=cfg)
    except (ConfigException, OSError) as exc:
        raise UsageError(f"Kubernetes credentials: {exc}") from None
    # One connection per watched type is held by its watch (17 types), plus Events and status writes: the
    # default pool (5 per CPU) would discard and reopen connections.
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize, 32)
    return client.ApiClient(cfg)
