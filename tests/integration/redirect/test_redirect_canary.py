"""Nothing an enrolled pod sends crosses the node-to-node link in clear: a canary payload sent by an
enrolled pod never shows up in a raw capture on the node's uplink, while the same payload from a pod that
is not enrolled does (the control, which proves the capture sees pod traffic)."""

from __future__ import annotations

import uuid
from contextlib import ExitStack

import pytest

from agent import netns as nsx
from agent.lab.plan import LabPlan
from agent.lab.probe import ECHO_PORT
from agent.redirect import marks, pins
from tests.integration.redirect.redirect_lab import (
    Agent,
    Capture,
    Client,
    Listener,
    send_raw_segment,
)

pytestmark = pytest.mark.root


def test_canary_of_enrolled_pods_never_on_the_wire(lab: LabPlan) -> None:
    enrolled_src, enrolled_dst = lab.pod("pod-1-1"), lab.pod("pod-2-1")
    plain_src, plain_dst = lab.pod("pod-1-2"), lab.pod("pod-2-2")
    canary, control = f"CANARY-{uuid.uuid4().hex}", f"CONTROL-{uuid.uuid4().hex}"
    with ExitStack() as roles:
        for pod in lab.pods():
            roles.enter_context(Listener(pod.netns, ECHO_PORT, pod.name, transparent=False))
        for node, pod in (("node-1", enrolled_src), ("node-2", enrolled_dst)):
            netns = lab.node(node).netns
            # The proxy stand-in takes the connection and keeps its bytes: with the real proxy they
            # would leave inside the mTLS tunnel instead.
            roles.enter_context(Listener(netns, marks.OUTBOUND_PORT, "agent"))
            agent = roles.enter_context(Agent(netns, node, pins.lab_pin_dir(lab.prefix, node)))
            agent.call("start")
            agent.call("enroll", pod.ip, f"default/{pod.name}", True)
        capture = roles.enter_context(Capture(lab.node("node-1").netns, "eth0", [canary, control]))

        mesh = roles.enter_context(Client(enrolled_src.netns, enrolled_dst.ip, ECHO_PORT))
        assert mesh.greeting == "agent"
        assert mesh.roundtrip(canary) == canary
        clear = roles.enter_context(Client(plain_src.netns, plain_dst.ip, ECHO_PORT))
        assert clear.greeting == plain_dst.name
        assert clear.roundtrip(control) == control

        result = capture.result()
        assert result["seen"][control] >= 1, result
        assert result["seen"][canary] == 0, result


def test_strict_flow_orphaned_by_a_dead_agent_never_leaks(lab: LabPlan) -> None:
    """The agent dies with a captured connection of a STRICT pod: later segments of that connection are
    dropped, not forwarded in clear; a flow the agent never took (older than enrolment) still passes."""
    node = lab.node("node-1")
    pod, remote = lab.pod("pod-1-1"), lab.pod("pod-2-1")
    orphan, older = f"ORPHAN-{uuid.uuid4().hex}", f"OLDER-{uuid.uuid4().hex}"
    with ExitStack() as roles:
        roles.enter_context(Listener(remote.netns, ECHO_PORT, remote.name, transparent=False))
        proxy = roles.enter_context(Listener(node.netns, marks.OUTBOUND_PORT, "agent", mode="reset"))
        agent = roles.enter_context(Agent(node.netns, node.name, pins.lab_pin_dir(lab.prefix, node.name)))
        agent.call("start")
        agent.call("enroll", pod.ip, "default/pod-1-1", True)
        capture = roles.enter_context(Capture(node.netns, "eth0", [orphan, older]))
        client = roles.enter_context(Client(pod.netns, remote.ip, ECHO_PORT))
        assert client.roundtrip("hello") == "hello"
        (accepted,) = proxy.accepts()
        flow_src = (accepted["peer"][0], accepted["peer"][1])
        proxy.kill()

        nsx.run_in(pod.netns, send_raw_segment, flow_src, (remote.ip, ECHO_PORT), orphan.encode())
        nsx.run_in(pod.netns, send_raw_segment, (pod.ip, 1), (remote.ip, ECHO_PORT), older.encode())
        result = capture.result()
        assert result["seen"][older] >= 1, result
        assert result["seen"][orphan] == 0, result
        assert agent.call("counters")["outbound_orphan_drop"] >= 1
