"""The Ray runtime: one owner starts it; the local cluster listens on loopback only (read from /proc)."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
            parents[int(entry.name)] = int(ppid)
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier += children
    return found


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes.update(link[8:-1] for link in links if link.startswith("socket:["))
    return inodes


def _listening(inodes: set[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses of the TCP sockets in LISTEN state (st 0A) among ``inodes``."""
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:
                continue
            raw = bytes.fromhex(cols[1].split(":")[0])
            if v6:  # four host-order 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                out.append(ipaddress.IPv6Address(raw))
            else:
                out.append(ipaddress.IPv4Address(raw[::-1]))
    return out


@pytest.mark.ray
def test_local_cluster_listens_on_loopback_only(ray_cluster):
    ray_cluster.get([ray_cluster.remote(lambda: 1).remote()])  # a worker process, with its own server
    addresses = _listening(_socket_inodes(_descendants(os.getpid())))
    assert len(addresses) >= 6  # GCS, raylet (2), dashboard agent, runtime-env agent, workers
    exposed = [a for a in addresses
               if not (a.is_loopback or (a.version == 6 and a.ipv4_mapped and a.ipv4_mapped.is_loopback))]
    assert exposed == []


def test_a_stage_without_the_owners_runtime_fails_at_once(tmp_path):
    # A subprocess: this session's cluster (if another test started it) must not be found.
    code = ("from cluster.recipe import load_recipe; from cluster.rundir import RunDir; "
            "from cluster.stage import StageContext; "
            f"StageContext(recipe=load_recipe(), run_dir=RunDir.create({str(tmp_path)!r})).ray()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1
    assert "RuntimeError: Ray is not started: run stages through `raylm`" in res.stderr


def test_ingress_auto_is_haproxy_on_pods_and_serves_proxy_on_a_local_cluster():
    from cluster.runtime import serve_ingress_env

    # a local cluster listens on loopback only; in HAProxy mode HAProxy's stats and exporter bind all interfaces
    assert serve_ingress_env("auto", local=True)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert serve_ingress_env("auto", local=False)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert serve_ingress_env("haproxy", local=True)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert serve_ingress_env("proxy", local=False)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_a_local_cluster_gets_haproxy_when_asked_unless_the_user_exported_otherwise(monkeypatch):
    from cluster.runtime import HAPROXY_FIXED_PORTS, export_serve_ingress_env

    for key in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER", *HAPROXY_FIXED_PORTS):
        monkeypatch.delenv(key, raising=False)
    export_serve_ingress_env("haproxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = {int(os.environ[key]) for key in HAPROXY_FIXED_PORTS}  # free ones, not Serve's fixed 8404/9101/...
    assert len(ports) == len(HAPROXY_FIXED_PORTS) and not ports & {8404, 9101, 8500, 9500}

    for key in HAPROXY_FIXED_PORTS:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # exported by the user: wins over the recipe
    export_serve_ingress_env("haproxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert not any(key in os.environ for key in HAPROXY_FIXED_PORTS)
