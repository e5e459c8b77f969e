"""`ambit lab up --kube`: the same netns lab, with its workloads as Pods in a real Kubernetes API server.

etcd and kube-apiserver run in the fabric namespace (beside the plane, which is their only client besides
the lab itself) on 127.0.0.1:6443, their state and keys under the lab's run dir (tmpfs /run). The lab
writes what the cluster's other components would (agent/lab/kube.py): a Node per lab node (InternalIP,
podCIDR), the `demo` Namespace (ambient), a ServiceAccount and a Pod per lab pod bound to its node, with
the status a kubelet reports (Running, podIP = the lab pod's address). The plane then runs with
`--source kube`, and `kubectl apply` (the pinned one, `kubectl()` here) changes the live mesh.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from agent import netns as nsx
from agent.errors import UsageError
from agent.lab import kube, mesh, state
from agent.lab.apiserver import ApiServer
from agent.lab.apiserver import kubectl as run_kubectl
from agent.lab.plan import LabPlan, PodPlan
from agent.lab.state import LabProcess
from api.resources.workload import AMBIENT, DATAPLANE_LABEL

CRDS = (Path(__file__).resolve().parents[2] / "deploy" / "crds").resolve()
Progress = Callable[[str], None]


def _gateway_api_crds() -> list[Path]:
    """The Gateway API CRDs `make setup` cached (scripts/gateway-api-crds.sh), so the lab's API server takes
    Gateways and HTTPRoutes; none when they are not fetched (the lab works without them)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "gateway-api-crds.sh"
    out = subprocess.run(["bash", str(script), "--path"], capture_output=True, text=True)
    return [Path(out.stdout.strip())] if out.returncode == 0 else []


def kube_dir(prefix: str) -> Path:
    return mesh.run_dir(prefix) / "kube"


def kubeconfig(prefix: str) -> Path:
    return kube_dir(prefix) / "kubeconfig"


def active(prefix: str) -> bool:
    """Whether this lab was brought up with --kube (its plane then reads the API server)."""
    return kubeconfig(prefix).exists()


def plane_source_args(prefix: str) -> list[str]:
    """`ambit mgmt` arguments for the lab's config source: the API server when the lab has one."""
    return ["--source", "kube", "--kubeconfig", str(kubeconfig(prefix))] if active(prefix) else []


def kubectl(plan: LabPlan, *args: str, stdin: str | None = None) -> str:
    """The pinned kubectl against the lab's API server (from inside the fabric namespace)."""
    out = run_kubectl(kubeconfig(plan.prefix), *args, netns=plan.fabric_netns, stdin=stdin)
    if out.returncode != 0:
        raise UsageError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def apply(plan: LabPlan, docs: Iterable[dict[str, Any]]) -> str:
    """`kubectl apply -f -` of `docs` (Istio / ambit policy objects, ...)."""
    return kubectl(plan, "apply", "-f", "-", stdin=yaml.safe_dump_all(list(docs), sort_keys=False))


def up(plan: LabPlan, progress: Progress, skip_pods: Iterable[str] = ()) -> None:
    """Start the API server in the lab's fabric and write the lab's nodes and pods into it (all but
    `skip_pods`, which tests create later)."""
    lab = state.load(plan.prefix)
    if lab is None:
        raise UsageError(f"no lab with prefix {plan.prefix!r}: run `ambit lab up` first")
    if not active(plan.prefix):
        progress(f"Kubernetes API server in {plan.fabric_netns} (127.0.0.1:6443)")
        kube_dir(plan.prefix).mkdir(parents=True, exist_ok=True)
        server = ApiServer(work=kube_dir(plan.prefix), netns=plan.fabric_netns).start()
        log = {name: str(kube_dir(plan.prefix) / f"{name}.log") for name in server.pids}
        lab.processes += [LabProcess(n, pid, plan.fabric_netns, log[n]) for n, pid in server.pids.items()]
        state.save(lab)
        for crds in (CRDS, *_gateway_api_crds()):
            kubectl(plan, "apply", "--server-side", "-f", str(crds))
            kubectl(plan, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds))
    skip = set(skip_pods)
    nsx.run_in(plan.fabric_netns, _write_cluster, str(kubeconfig(plan.prefix)), plan, skip, timeout=120)
    progress(
        f"API server holds {len(plan.nodes)} Nodes and {len(plan.pods()) - len(skip)} running Pods "
        f"in namespace {mesh.MESH_NAMESPACE} (kubeconfig {kubeconfig(plan.prefix)})"
    )


def _client(config_file: str) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=config_file)


def _write_cluster(config_file: str, plan: LabPlan, skip: set[str]) -> None:
    api = _client(config_file)
    kube.ensure_namespace(api, mesh.MESH_NAMESPACE, {DATAPLANE_LABEL: AMBIENT})
    for node in plan.nodes:
        kube.ensure_node(api, node.name, node.ip, node.pod_cidr)
    for pod in plan.pods():
        if pod.name not in skip:
            _run_pod(api, plan, pod)


def _run_pod(api: Any, plan: LabPlan, pod: PodPlan) -> None:
    sa = mesh.service_account(pod.name)
    kube.ensure_service_account(api, mesh.MESH_NAMESPACE, sa)
    body = kube.pod_body(mesh.MESH_NAMESPACE, pod.name, pod.node, sa, {"app": pod.name}, [mesh.APP_PORT])
    kube.run_pod(api, body, pod.ip, plan.node(pod.node).ip)


def _delete_pod(config_file: str, name: str) -> None:
    kube.delete_pod(_client(config_file), mesh.MESH_NAMESPACE, name)


def _create_pod(config_file: str, plan: LabPlan, name: str) -> None:
    _run_pod(_client(config_file), plan, plan.pod(name))


def run_pod(plan: LabPlan, name: str) -> None:
    """Create the lab pod `name` in the API server and report it running at its lab address."""
    nsx.run_in(plan.fabric_netns, _create_pod, str(kubeconfig(plan.prefix)), plan, name)


def delete_pod(plan: LabPlan, name: str) -> None:
    nsx.run_in(plan.fabric_netns, _delete_pod, str(kubeconfig(plan.prefix)), name)


def in_api(plan: LabPlan, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(api_client, *args) inside the fabric namespace (where the API server is reachable)."""
    return nsx.run_in(plan.fabric_netns, _call, str(kubeconfig(plan.prefix)), fn, args)


def _call(config_file: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(_client(config_file), *args)


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 20.0) -> float:
    """Poll `ready` until true; the seconds it took (UsageError after `timeout`)."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise UsageError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - start
