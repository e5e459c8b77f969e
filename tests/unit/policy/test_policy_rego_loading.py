"""regopy (rego-cpp, ~11 MB resident) is loaded with the first RegoPolicy, not with the policy engine; a node
whose regopy does not load refuses RegoPolicies (fail closed: the update is rejected, the old set stays)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUP = "import sys\nfrom test_policy_table import REGO_PORTS, ap, conn, engine_with, rego, snapshot\n"


def _run(script: str) -> list[str]:
    """Fresh interpreter (this one may already hold regopy): the printed lines of `script`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[2]), str(HERE)])}
    done = subprocess.run(
        [sys.executable, "-c", SETUP + script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_regopy_is_loaded_only_with_a_rego_policy() -> None:
    loaded = _run(
        "engine = engine_with([ap()])\n"
        "print('regopy' in sys.modules)\n"
        "engine.update(snapshot([ap(), rego(REGO_PORTS)], version=2))\n"
        "print('regopy' in sys.modules, engine.authorize(conn()).allow)\n"
    )
    assert loaded == ["False", "True", "True"]


def test_a_rego_policy_without_regopy_is_rejected_and_the_old_set_stays() -> None:
    out = _run(
        "sys.modules['regopy'] = None  # what an agent whose regopy does not load sees: ImportError\n"
        "from agent.policy.errors import PolicyError\n"
        "engine = engine_with([ap(action='DENY', rules=[{}])])  # denies all\n"
        "try:\n"
        "    engine.update(snapshot([rego(REGO_PORTS)], version=2))\n"
        "except PolicyError as exc:\n"
        "    print('rejected' if 'regopy' in str(exc) else exc)\n"
        "print(engine.authorize(conn()).allow)\n"
    )
    assert out == ["rejected", "False"]
