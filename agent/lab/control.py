"""Lab lifecycle: up (idempotent), down (leaves nothing), status, and running commands in pods."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from agent import netns as nsx
from agent.errors import UsageError
from agent.lab import fabric, state
from agent.lab.plan import LabPlan
from agent.lab.state import LabProcess, LabState

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def up(plan: LabPlan, progress: Progress = _quiet) -> LabState:
    """Build the lab; if the same lab is already up and whole, return it untouched."""
    current = state.load(plan.prefix)
    if current is not None:
        if current.plan != plan:
            raise UsageError(
                f"a different lab with prefix {plan.prefix!r} is up "
                f"({len(current.plan.nodes)} nodes); run `ambit lab down` first"
            )
        missing = set(plan.netns_names()) - set(fabric.existing_netns(plan.prefix))
        if not missing:
            progress("lab already up")
            return current
        progress(f"lab incomplete (missing {', '.join(sorted(missing))}); rebuilding")
        down(plan.prefix, progress)
    leftovers = fabric.existing_netns(plan.prefix)
    if leftovers:
        progress(f"removing stale namespaces {', '.join(leftovers)}")
        fabric.remove_netns(leftovers)
    lab = LabState(plan=plan)
    # Record first, so a crash half-way leaves a state file that `down` can clean up after.
    state.save(lab)
    try:
        progress(f"building {len(plan.nodes)} nodes x {len(plan.nodes[0].pods)} pods")
        fabric.build(plan, progress)
    except Exception:
        down(plan.prefix, progress)
        raise
    progress("lab up")
    return lab


def down(prefix: str, progress: Progress = _quiet) -> list[str]:
    """Stop lab processes, unmount lab mounts, delete every namespace with the prefix. Returns what went."""
    lab = state.load(prefix)
    removed: list[str] = []
    if lab is not None:
        fabric.stop_pids([p.pid for p in lab.processes])
        for mount in reversed(lab.mounts):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    names = sorted(set(fabric.existing_netns(prefix)) | set(lab.plan.netns_names() if lab else []))
    names = [n for n in names if n in fabric.existing_netns(prefix)]
    if names:
        progress(f"removing {len(names)} namespaces")
        fabric.remove_netns(names)
        removed = names
    _remove_mesh_leftovers(prefix, progress)
    state.remove(prefix)
    progress("lab down")
    return removed


def _remove_mesh_leftovers(prefix: str, progress: Progress) -> None:
    """The mesh's run directory (plane state, tokens, logs) and BPF pins an agent kept or could not remove."""
    from agent.redirect.pins import cleanup_pins

    run = state.state_dir() / f"mesh-{prefix.rstrip('-')}"
    if run.exists():
        progress(f"removing {run}")
        shutil.rmtree(run, ignore_errors=True)
    for pinned in cleanup_pins(prefix):
        progress(f"removed BPF pins {pinned}")


def start_process(prefix: str, name: str, netns_name: str, argv: list[str], log: Path) -> LabProcess:
    """Start a long-running lab process (plane, agent) in a namespace; `down` stops it."""
    lab = require(prefix)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = nsx.popen_in(netns_name, argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    entry = LabProcess(name=name, pid=proc.pid, netns=netns_name, log=str(log))
    lab.processes = [p for p in lab.processes if p.name != name] + [entry]
    state.save(lab)
    return entry


def stop_process(prefix: str, name: str) -> None:
    lab = require(prefix)
    for proc in lab.processes:
        if proc.name == name:
            fabric.stop_pids([proc.pid])
    lab.processes = [p for p in lab.processes if p.name != name]
    state.save(lab)


def require(prefix: str) -> LabState:
    lab = state.load(prefix)
    if lab is None:
        raise UsageError(f"no lab with prefix {prefix!r} is up; run `ambit lab up`")
    return lab


def status_rows(lab: LabState) -> list[dict[str, str]]:
    present = set(fabric.existing_netns(lab.plan.prefix))
    rows = []
    for node in lab.plan.nodes:
        rows.append(
            {
                "kind": "node",
                "name": node.name,
                "node": node.name,
                "ip": node.ip,
                "cidr": node.pod_cidr,
                "netns": node.netns,
                "state": "up" if node.netns in present else "MISSING",
            }
        )
        for pod in node.pods:
            rows.append(
                {
                    "kind": "pod",
                    "name": pod.name,
                    "node": node.name,
                    "ip": pod.ip,
                    "cidr": f"{pod.ip}/32",
                    "netns": pod.netns,
                    "state": "up" if pod.netns in present else "MISSING",
                }
            )
    for proc in lab.processes:
        alive = proc.pid in fabric.pids_in_netns(proc.netns)
        rows.append(
            {
                "kind": "process",
                "name": proc.name,
                "node": proc.netns,
                "ip": "",
                "cidr": "",
                "netns": proc.netns,
                "state": f"running pid {proc.pid}" if alive else "exited",
            }
        )
    return rows


def netns_for(lab: LabState, target: str) -> str:
    """The namespace of a pod or node name."""
    names = {p.name: p.netns for p in lab.plan.pods()} | {n.name: n.netns for n in lab.plan.nodes}
    if target not in names:
        raise UsageError(f"unknown pod or node {target!r} (known: {', '.join(names)})")
    return names[target]
