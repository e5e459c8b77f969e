"""Live changes: enrolment follows config without touching running connections, and an agent restart
with the datapath kept leaves pinned state and captured connections working."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from agent.lab.plan import LabPlan
from agent.lab.probe import ECHO_PORT
from agent.redirect import marks, pins
from tests.integration.redirect.redirect_lab import Agent, Client, Listener, greeting_of

pytestmark = pytest.mark.root


def test_enrol_and_unenrol_while_connections_run(lab: LabPlan) -> None:
    node = lab.node("node-1")
    pod, remote = lab.pod("pod-1-1"), lab.pod("pod-2-1")
    with ExitStack() as roles:
        roles.enter_context(Listener(remote.netns, ECHO_PORT, remote.name, transparent=False))
        roles.enter_context(Listener(node.netns, marks.OUTBOUND_PORT, "agent"))
        agent = roles.enter_context(Agent(node.netns, node.name, pins.lab_pin_dir(lab.prefix, node.name)))
        agent.call("start")

        before = roles.enter_context(Client(pod.netns, remote.ip, ECHO_PORT))
        assert before.greeting == remote.name
        agent.call("enroll", pod.ip, "default/pod-1-1", True)
        # A connection older than the enrolment keeps flowing directly, even for a STRICT pod.
        assert before.roundtrip("older") == "older"
        captured = roles.enter_context(Client(pod.netns, remote.ip, ECHO_PORT))
        assert captured.greeting == "agent"

        agent.call("unenroll", pod.ip)
        # A captured connection stays with the agent's socket after unenrolment; new ones go direct.
        assert captured.roundtrip("captured") == "captured"
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == remote.name
        assert before.roundtrip("still") == "still"

        agent.call("enroll", pod.ip, "default/pod-1-1", False)
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == "agent"
        assert agent.call("enrolled") == {pod.ip: {"workload": "default/pod-1-1", "strict": False}}
        counters = agent.call("counters")
        assert counters["enrolled_flow_pass"] > 0
        assert counters["socket_assigned"] > 0


def test_restart_keeps_pinned_state_and_connections(lab: LabPlan) -> None:
    node = lab.node("node-1")
    pod, remote = lab.pod("pod-1-1"), lab.pod("pod-2-1")
    pin_dir = pins.lab_pin_dir(lab.prefix, node.name)
    with ExitStack() as roles:
        roles.enter_context(Listener(remote.netns, ECHO_PORT, remote.name, transparent=False))
        roles.enter_context(Listener(node.netns, marks.OUTBOUND_PORT, "agent"))
        first = roles.enter_context(Agent(node.netns, node.name, pin_dir))
        first.call("start")
        first.call("enroll", pod.ip, "default/pod-1-1", True)
        captured = roles.enter_context(Client(pod.netns, remote.ip, ECHO_PORT))
        assert captured.greeting == "agent"
        programs = {r["name"]: r["value"] for r in first.call("rows") if r["kind"] == "program"}

        first.call("stop", True)  # keep_datapath: the process exits, the datapath stays
        assert {p.name for p in Path(pin_dir).iterdir()} >= {"pods", "counters", "prog_pod_ingress"}
        assert captured.roundtrip("while down") == "while down"
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == "agent"

        second = roles.enter_context(Agent(node.netns, node.name, pin_dir))
        second.call("start")
        assert second.call("enrolled") == {pod.ip: {"workload": "default/pod-1-1", "strict": True}}
        rows = second.call("rows")
        attached = {(r["name"], r["value"]) for r in rows if r["kind"] == "attachment"}
        pod_hooks = {(link, hook) for link in ("vp1", "vp2") for hook in ("pod_ingress", "pod_egress")}
        assert attached == pod_hooks | {("eth0", "uplink_ingress")}
        # The new run's programs replaced the old ones on every link; counters survived in the pinned map.
        new_programs = {r["name"]: r["value"] for r in rows if r["kind"] == "program"}
        assert new_programs.keys() == programs.keys() and new_programs != programs
        assert second.call("counters")["outbound_captured"] >= 2
        assert captured.roundtrip("after restart") == "after restart"
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == "agent"
        # What the pinned state already says is not re-done.
        assert second.call("sync", {pod.ip: ["default/pod-1-1", True]})["enrolled"] == []

        # Reconciling against config: the pod is no longer wanted, an off-node pod cannot be enrolled.
        synced = second.call("sync", {remote.ip: ["default/pod-2-1", False]})
        assert synced == {
            "enrolled": [],
            "unenrolled": [pod.ip],
            "failed": {remote.ip: f"pod {remote.ip} is not on node node-1: its route goes via eth0"},
        }
        assert second.call("enrolled") == {}
        assert second.call("counters")["enroll_errors"] == 1
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == remote.name

        second.call("stop", False)
        assert not Path(pin_dir).exists()
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == remote.name
