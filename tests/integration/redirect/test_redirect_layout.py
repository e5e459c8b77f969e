"""The Python mirror of bpf/ambit_maps.h matches the header (and the kernel's pinned maps), and the pin
bookkeeping removes exactly a lab's own directories. Only the last test needs root: the others read the
C source, they do not load it."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import pytest

from agent.redirect import maps, pins, sources, syscall

HEADER = (sources.BPF_DIR / "ambit_maps.h").read_text()


def test_counter_enum_matches_python_names() -> None:
    body = re.search(r"enum ambit_counter \{(.*?)\};", HEADER, re.S)
    assert body is not None
    names = re.findall(r"AMBIT_CTR_(\w+)", body.group(1))
    assert names[-1] == "MAX"
    assert tuple(n.lower() for n in names[:-1]) == maps.COUNTERS


def test_pod_struct_matches_header() -> None:
    assert f"#define AMBIT_WORKLOAD_LEN {maps.WORKLOAD_LEN}" in HEADER
    assert f"AMBIT_MODE_STRICT = {maps.MODE_STRICT}," in HEADER
    assert f"AMBIT_MODE_PERMISSIVE = {maps.MODE_PERMISSIVE}," in HEADER
    body = re.search(r"struct ambit_pod \{(.*?)\};", HEADER, re.S)
    assert body is not None
    fields = re.findall(r"^\s*\w+\s+(\w+)(?:\[\w+\])?;", body.group(1), re.M)
    assert fields == [f[0] for f in maps.Pod._fields_]
    assert ctypes.sizeof(maps.Pod) == 4 + 4 + maps.WORKLOAD_LEN
    assert ctypes.sizeof(maps.PodKey) == 4
    flow = re.search(r"struct ambit_flow_key \{(.*?)\};", HEADER, re.S)
    assert flow is not None
    assert re.findall(r"(\w+);", flow.group(1)) == [f[0] for f in maps.FlowKey._fields_]


def test_pod_key_is_network_order_ipv4_only() -> None:
    assert bytes(maps.pod_key("10.244.1.2")) == bytes([10, 244, 1, 2])
    for bad in ("fd00::1", "10.244.1", "pod-1-1", ""):
        with pytest.raises(ValueError):
            maps.pod_key(bad)


def test_includes_are_inlined_once() -> None:
    for hook in sources.HOOKS:
        text = sources.expand_includes(sources.BPF_DIR / f"{hook}.c")
        assert '#include "' not in text
        assert text.count("BPF_TABLE_PINNED(") == 3
        assert f"int {hook}(struct __sk_buff *skb)" in text


def test_cleanup_pins_takes_only_the_lab_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pins, "PIN_ROOT", tmp_path)
    for name in ("amb-node-1", "amb-node-12", "amb-x-node-1", "other", "amb-node-1x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pods").touch()
    removed = pins.cleanup_pins("amb-")
    assert [Path(p).name for p in removed] == ["amb-node-1", "amb-node-12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["amb-node-1x", "amb-x-node-1", "other"]


def _start_over_foreign_pin(pin_dir: str) -> str:
    from agent.redirect.redirector import Redirector

    # An agent with another layout pinned `pods` (8-byte values) before this one starts.
    foreign = syscall.map_create(syscall.BPF_MAP_TYPE_HASH, 4, 8, 16, 0, "ambit_pods")
    pins.pin_fd(foreign, Path(pin_dir) / "pods")
    redirector = Redirector("node-x", Path(pin_dir))
    try:
        redirector.start()
    except maps.LayoutError as exc:
        return str(exc)
    finally:
        os.close(foreign)
    redirector.stop()
    return "started"


@pytest.mark.root
def test_pinned_map_of_another_layout_is_refused(lab_prefix: str) -> None:
    from pyroute2 import netns

    from agent import netns as nsx

    name = f"{lab_prefix}bare"
    pin_dir = pins.PIN_ROOT / f"{lab_prefix}node-x"
    pins.ensure_bpffs()
    pin_dir.mkdir(parents=True, exist_ok=True)
    netns.create(name)  # an empty namespace: the redirector must never touch the host's links
    try:
        message = nsx.run_in(name, _start_over_foreign_pin, str(pin_dir))
    finally:
        netns.remove(name)
        pins.remove_pin_dir(pin_dir)
    assert "pinned map 'ambit_pods' has values of 8 bytes" in message
