"""`make lab`: the project's main job on one machine, narrated step by step."""

from __future__ import annotations

from agent.lab import control
from agent.lab.control import Progress
from agent.lab.plan import plan_lab
from agent.lab.probe import check_all_pairs
from agent.output import render


def run_demo(prefix: str, progress: Progress) -> int:
    plan = plan_lab(2, 2, prefix)
    lab = control.up(plan, progress)
    try:
        print(render(control.status_rows(lab), "table", ["kind", "name", "node", "ip", "netns", "state"]))
        progress("TCP echo between every pair of pods")
        results = check_all_pairs(plan)
        rows = [{"from": r.src, "to": r.dst, "result": "ok" if r.ok else "FAIL"} for r in results]
        print(render(rows))
        failed = [r for r in results if not r.ok]
        if failed:
            progress(f"{len(failed)} of {len(results)} pod pairs failed")
            return 1
        progress(f"all {len(results)} pod pairs reachable")
        return 0
    finally:
        control.down(prefix, progress)
