"""Cost of the redirection programs on traffic they do not capture: one TCP stream from a pod that is not
enrolled to a pod on another node, without the programs and with them attached (on every pod veth and the
uplink of both nodes, other pods enrolled). Expected ratio ~1.0: such a packet costs one socket lookup and
one hash lookup."""

from __future__ import annotations

import statistics
import uuid
from contextlib import ExitStack
from typing import Any

from agent.lab.plan import LabPlan, PodPlan
from agent.redirect import pins
from tests.integration.redirect.redirect_lab import Agent, Sink, two_node_lab

SINK_PORT = 7009
SECONDS = 1.0
SAMPLES = 3


def start_agent(roles: ExitStack, lab: LabPlan, node: str, spare: PodPlan) -> Agent:
    """The node's redirector, with the node's first pod enrolled unless it is `spare` (the sink)."""
    agent = roles.enter_context(Agent(lab.node(node).netns, node, pins.lab_pin_dir(lab.prefix, node)))
    agent.call("start")
    first = lab.node(node).pods[0]
    if first != spare:
        agent.call("enroll", first.ip, f"default/{first.name}", False)
    return agent


def run() -> list[dict[str, Any]]:
    prefix = "b" + uuid.uuid4().hex[:4] + "-"
    without: list[float] = []
    with_programs: list[float] = []
    with two_node_lab(prefix) as lab, ExitStack() as roles:
        src, dst = lab.pod("pod-1-2"), lab.pod("pod-2-1")
        sink = roles.enter_context(Sink(dst.netns, SINK_PORT))

        def measure() -> float:
            return sink.gbits(src.netns, dst.ip, SINK_PORT, SECONDS)

        # Samples bracket the attached ones (3 without, 6 with, 3 without), medians compared: drift and
        # other load on a shared machine then hit both sides alike.
        without.extend(measure() for _ in range(SAMPLES))
        agents = [start_agent(roles, lab, node.name, dst) for node in lab.nodes]
        with_programs.extend(measure() for _ in range(2 * SAMPLES))
        for agent in agents:
            agent.call("stop")
        without.extend(measure() for _ in range(SAMPLES))
    base = "non-enrolled pod -> other node, 1 stream, no programs"
    plain, attached = statistics.median(without), statistics.median(with_programs)
    return [
        {"name": base, "value": plain, "unit": "Gbit/s", "baseline": ""},
        {
            "name": "non-enrolled pod -> other node, 1 stream, programs attached",
            "value": attached,
            "unit": "Gbit/s",
            "baseline": base,
        },
    ]
