"""netmove: the service address moves between nodes and peers' ARP caches follow at once.

Run for real in two throw-away network namespaces joined by a veth pair: "node" (10.77.0.1/24)
runs netmove's CLI, "peer" (10.77.0.250/24) holds a neighbour entry for the service address
pointing at some other MAC — as a client's cache does right after a migration — and must see
it re-pointed by the gratuitous ARP alone, long before the entry would go stale."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit.payloads import netmove

SCRIPT = Path(netmove.__file__)
ADDR = "10.77.0.200"
OLD_MAC = "02:00:00:00:00:01"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip")
                                or sys.platform != "linux",
                                reason="needs root and iproute2 (network namespaces)")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def lan() -> Iterator[tuple[str, str]]:
    node, peer = f"lkh5n{os.getpid()}", f"lkh5p{os.getpid()}"
    try:
        for ns in (node, peer):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", node, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
           "netns", peer)
        sh("ip", "-n", node, "addr", "add", "10.77.0.1/24", "dev", "lan0")
        sh("ip", "-n", peer, "addr", "add", "10.77.0.250/24", "dev", "lan1")
        for ns, dev in ((node, "lan0"), (peer, "lan1")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield node, peer
    finally:
        for ns in (node, peer):
            sh("ip", "netns", "del", ns, check=False)


def netmove_cli(ns: str, *args: str) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, sys.executable, "-I", str(SCRIPT), *args, check=False)


def addrs(ns: str) -> str:
    return sh("ip", "-n", ns, "-4", "-o", "addr").stdout


def neigh(ns: str, addr: str) -> str:
    return sh("ip", "-n", ns, "neigh", "show", addr).stdout


def test_take_announces_and_give_removes(lan: tuple[str, str]) -> None:
    node, peer = lan
    mac = sh("ip", "-n", node, "-o", "link", "show", "lan0").stdout.split("link/ether ")[1][:17]
    # the peer's cache says the address lives elsewhere, and is fresh: only a gratuitous ARP
    # (which overrides the lock time) re-points it
    sh("ip", "-n", peer, "neigh", "replace", ADDR, "lladdr", OLD_MAC, "dev", "lan1", "nud",
       "reachable")
    assert OLD_MAC in neigh(peer, ADDR)

    r = netmove_cli(node, "take", "--address", ADDR)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "lan0"
    assert f"inet {ADDR}/32" in addrs(node)
    assert mac in neigh(peer, ADDR), neigh(peer, ADDR)

    again = netmove_cli(node, "take", "--address", ADDR)  # idempotent: setup may repeat it
    assert again.returncode == 0, again.stderr

    r = netmove_cli(node, "give", "--address", ADDR)
    assert (r.returncode, r.stdout.strip()) == (0, "removed"), r.stderr
    assert ADDR not in addrs(node)
    assert "10.77.0.1/24" in addrs(node)  # the node's own address is untouched
    r = netmove_cli(node, "give", "--address", ADDR)
    assert (r.returncode, r.stdout.strip()) == (0, "absent"), r.stderr


def test_no_lan_for_the_address_is_named(lan: tuple[str, str]) -> None:
    node, _peer = lan
    r = netmove_cli(node, "take", "--address", "10.99.0.200")
    assert r.returncode == 1
    assert "no interface here has an IPv4 subnet holding 10.99.0.200" in r.stderr
    assert "10.99.0.200" not in addrs(node)


def test_garp_frames_are_gratuitous() -> None:
    mac = bytes.fromhex("0a0b0c0d0e0f")
    req, rep = netmove.garp_frames(ADDR, mac)
    for frame, op in ((req, 1), (rep, 2)):
        assert len(frame) == 60
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
        arp = frame[14:42]
        assert arp[6:8] == op.to_bytes(2, "big")
        assert arp[8:14] == mac
        assert arp[14:18] == arp[24:28] == bytes([10, 77, 0, 200])  # sender IP = target IP
