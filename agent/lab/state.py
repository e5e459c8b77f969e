"""The lab's state file: what `up` built, so `status`, `exec` and `down` work from any later process."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.lab.plan import LabPlan


def state_dir() -> Path:
    return Path(os.environ.get("AMBIT_LAB_STATE_DIR", "/run/ambit"))


@dataclass
class LabProcess:
    """A long-running process the lab started (management plane, agents), stopped by `down`."""

    name: str
    pid: int
    netns: str
    log: str = ""


@dataclass
class LabState:
    plan: LabPlan
    processes: list[LabProcess] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "processes": [vars(p) for p in self.processes],
            "mounts": list(self.mounts),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabState:
        return cls(
            plan=LabPlan.from_dict(d["plan"]),
            processes=[LabProcess(**p) for p in d.get("processes", [])],
            mounts=list(d.get("mounts", [])),
        )


def state_path(prefix: str) -> Path:
    return state_dir() / f"lab-{prefix.rstrip('-')}.json"


def load(prefix: str) -> LabState | None:
    path = state_path(prefix)
    if not path.exists():
        return None
    return LabState.from_dict(json.loads(path.read_text()))


def save(state: LabState) -> None:
    path = state_path(state.plan.prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2))
    os.replace(tmp, path)


def remove(prefix: str) -> None:
    state_path(prefix).unlink(missing_ok=True)
