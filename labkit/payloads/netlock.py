#!/usr/bin/env python3
"""CRIU's network lock for established TCP connections, as iptables rules: set, lifted, and
swept when a killed ``criu`` or driver left them behind.

Node-side payload: python3 stdlib only, never imports labkit. The CRIU driver locks a
connection on dst before a restore and unlocks a resumed source or a killed copy; netmove
sweeps the service's stale locks at a run's setup and cleanup.

Why the rules are CRIU's own (criu/netfilter.c IPTABLES_CONN_CMD, two per connection: DROP in
and out, except packets marked SOCCR_MARK): a ``criu restore`` deletes exactly that spec at its
end, so a lock the driver set is lifted by CRIU, and one CRIU's dump set is lifted by the
driver. Why a sweep: a lock outlives its connection when its owner is killed, and drops every
later connection that happens to reuse the client's port (a long matrix campaign reuses
ephemeral ports)."""

from __future__ import annotations

import re
import subprocess

if __package__:
    from .nfqueue import IPTABLES_TIMEOUT  # one xtables-lock wait for every rule on a node
else:  # imported by a script beside it
    from nfqueue import IPTABLES_TIMEOUT  # type: ignore[no-redef]

SOCCR_MARK = "0xc114"  # CRIU's (libsoccr) packets carry it: its lock rules let them through
CLEAR_MAX = 256  # stale lock rules clear() removes at most in one call


class LockError(Exception):
    pass


def lock_rules(local: str, peer: str) -> list[list[str]]:
    """The two rules for one connection ("A:P" each), without the -I/-D: in, then out."""
    (lip, lport), (pip, pport) = local.rsplit(":", 1), peer.rsplit(":", 1)
    rule = ["--protocol", "tcp", "-m", "mark", "!", "--mark", SOCCR_MARK]
    return [["INPUT", *rule, "--source", pip, "--sport", pport, "--destination", lip,
             "--dport", lport, "-j", "DROP"],
            ["OUTPUT", *rule, "--source", lip, "--sport", lport, "--destination", pip,
             "--dport", pport, "-j", "DROP"]]


def _iptables(verb: str, rule: list[str]) -> subprocess.CompletedProcess:
    """iptables VERB RULE in the filter table; FileNotFoundError where it is absent."""
    try:
        return subprocess.run(["iptables", "-w", str(int(IPTABLES_TIMEOUT)), "-t", "filter", verb,
                               *rule], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=IPTABLES_TIMEOUT + 5)
    except subprocess.TimeoutExpired:
        raise LockError(f"iptables {verb} took over {IPTABLES_TIMEOUT + 5:g} s") from None


def lock(conns: list[tuple[str, str]]) -> None:
    """Drop these connections' packets here, both ways. One iptables-restore: one exec, as
    this runs inside a migration's downtime."""
    lines = ["*filter"]
    for local, peer in conns:
        lines += ["-I " + " ".join(r) for r in lock_rules(local, peer)]
    lines.append("COMMIT\n")
    try:
        p = subprocess.run(["iptables-restore", "-w", "--noflush"], input="\n".join(lines),
                           capture_output=True, text=True, timeout=IPTABLES_TIMEOUT + 5)
    except FileNotFoundError:
        raise LockError("iptables-restore not installed: the connection cannot be locked "
                        "(CRIU's network lock needs iptables too)") from None
    except subprocess.TimeoutExpired:
        raise LockError(f"iptables-restore took over {IPTABLES_TIMEOUT + 5:g} s") from None
    if p.returncode != 0:
        raise LockError(f"locking the connection(s): iptables-restore: "
                        f"{(p.stderr or p.stdout).strip()}")


def unlock(conns: list[tuple[str, str]]) -> list[str]:
    """Delete these connections' lock rules; a rule that is not there is no error (a restore
    deletes its own). -> the rules deleted, as "CHAIN local-peer"."""
    gone = []
    for local, peer in conns:
        for rule in lock_rules(local, peer):
            while True:  # twice inserted, twice deleted
                try:
                    if _iptables("-D", rule).returncode != 0:
                        break
                except (FileNotFoundError, LockError):
                    break
                gone.append(f"{rule[0]} {local}-{peer}")
    return gone


def stale(address: str, port: int) -> set[str]:
    """The peers ("IP:PORT") of every lock here whose local side is ``address``:``port``:
    rules in exactly the shape ``iptables -S`` prints CRIU's (legacy and nft alike), in
    either chain. Nothing else matches, so a rule of someone else's is never touched.
    set() where iptables is absent."""
    a, m = re.escape(address), re.escape(SOCCR_MARK)
    shapes = {"INPUT": re.compile(rf"-A INPUT -s (\S+)/32 -d {a}/32 -p tcp -m mark ! --mark "
                                  rf"{m} -m tcp --sport (\d+) --dport {port} -j DROP"),
              "OUTPUT": re.compile(rf"-A OUTPUT -s {a}/32 -d (\S+)/32 -p tcp -m mark ! --mark "
                                   rf"{m} -m tcp --sport {port} --dport (\d+) -j DROP")}
    peers = set()
    for chain, shape in shapes.items():
        try:
            p = _iptables("-S", [chain])
        except FileNotFoundError:
            return set()
        if p.returncode != 0:
            raise LockError(f"iptables -S {chain}: {(p.stderr or p.stdout).strip()}")
        for line in p.stdout.splitlines():
            if hit := shape.fullmatch(line.strip()):
                peers.add(f"{hit[1]}:{hit[2]}")
    return peers


def clear(address: str, port: int) -> int:
    """Delete the stale locks of ``address``:``port`` by their canonical spec (call it only
    where no migration of that service is under way: a live restore's lock looks the
    same). -> how many rules went."""
    removed = 0
    while peers := stale(address, port):
        gone = unlock([(f"{address}:{port}", peer) for peer in sorted(peers)])
        if not gone:
            raise LockError(f"iptables -D would not remove the lock of {address}:{port} with "
                            f"{', '.join(sorted(peers))}")
        removed += len(gone)
        if removed > CLEAR_MAX:
            raise LockError(f"more than {CLEAR_MAX} lock rules for {address}:{port}")
    return removed
