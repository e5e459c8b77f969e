"""The admin API's memory view reads this process's own /proc files: real numbers, not a model."""

import sys

from agent import memory


def test_report_totals_add_up_and_name_the_loaded_modules() -> None:
    report = memory.report()
    assert report["rss_kib"] == report["anon_kib"] + report["file_kib"] > 0  # type: ignore[operator]
    names = [row["mapping"] for row in report["mappings"]]  # type: ignore[attr-defined]
    assert len(names) <= memory.TOP_MAPPINGS and "[heap]" in memory.mappings()
    assert any(name.startswith("python3") or name.startswith("libpython") for name in names)
    assert "agent.memory" in report["python_modules"]  # type: ignore[operator]
    assert sorted(sys.modules) == report["python_modules"]
