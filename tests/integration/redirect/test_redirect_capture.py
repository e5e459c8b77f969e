"""Outbound capture in a two-node lab: enrolled pods reach the agent's listener with their original
destination; pods that are not enrolled bypass it; STRICT pods fail closed when the listener is absent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab import control
from agent.lab.plan import LabPlan, plan_lab
from agent.redirect import marks, pins
from tests.integration.redirect.redirect_lab import Agent, Listener, greeting_of

pytestmark = pytest.mark.root

ECHO_PORT = 7007


@pytest.fixture
def lab(lab_prefix: str) -> Iterator[LabPlan]:
    plan = plan_lab(2, 2, lab_prefix)
    control.up(plan)
    try:
        yield plan
    finally:
        control.down(lab_prefix)
        pins.cleanup_pins(lab_prefix)


def test_enrolled_pod_is_captured_with_original_destination(lab: LabPlan) -> None:
    node = lab.node("node-1")
    pod, other, remote = lab.pod("pod-1-1"), lab.pod("pod-1-2"), lab.pod("pod-2-1")
    server = Listener(remote.netns, ECHO_PORT, remote.name, transparent=False)
    proxy = Listener(node.netns, marks.OUTBOUND_PORT, "agent")
    agent = Agent(node.netns, node.name, pins.lab_pin_dir(lab.prefix, node.name))
    try:
        agent.call("start")
        agent.call("enroll", pod.ip, "default/pod-1-1", False)
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == "agent"
        accepted = proxy.accepts()
        assert [(a["peer"][0], tuple(a["orig_dst"])) for a in accepted] == [(pod.ip, (remote.ip, ECHO_PORT))]
        # Not enrolled: straight to the server.
        assert greeting_of(other.netns, remote.ip, ECHO_PORT) == remote.name
        assert proxy.accepts() == []
        counters = agent.call("counters")
        assert counters["outbound_captured"] == 1
        assert counters["not_enrolled_pass"] > 0
        rows = agent.call("rows")
        assert {"kind": "pod", "name": pod.ip, "value": "PERMISSIVE", "detail": "default/pod-1-1"} in rows
        attached = {r["name"]: r["value"] for r in rows if r["kind"] == "attachment"}
        assert attached == {"vp1": "pod_ingress", "vp2": "pod_ingress", "eth0": "uplink_ingress"}
        agent.call("stop")
        assert not Path(pins.lab_pin_dir(lab.prefix, node.name)).exists()
    finally:
        for role in (agent, proxy, server):
            role.stop()
