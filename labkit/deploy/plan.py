"""Planning (pure): what one node has, read from its probe, against what the bundle holds.

The probe is ``labkit/nodeside/probe.sh`` (its output parsed by ``parse_sh_probe``) for a
deploy, or the stage agent's hashing ``probe`` for ``--check``; both yield one shape::

    {"leftovers": [...], "current": REL | None, "previous": REL | None}
    REL = {"id", "files": {path: {sha256, size, mode}}, "suspect": [...] | "missing"/"modified",
           "revision", "dirty", ...} or {"id", "error"}

A node file is a copy source only when its release's MANIFEST lists it and it is not
suspected of local modification (touched after the release's ``.labkit-stat`` marker, or
missing), so an edit made on the node is never propagated into a new release.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from labkit import nodeside
from labkit.deploy.bundle import Bundle, BundleFile, files_digest, short_rev
from labkit.errors import NodeError
from labkit.text import plural


@dataclass
class Plan:
    """What one node needs: files to send, files to copy from a release already there."""

    send: list[BundleFile] = field(default_factory=list)
    link: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (release, path)

    @property
    def send_bytes(self) -> int:
        return sum(f.size for f in self.send)

    def without_links(self, paths: list[str], bundle: Bundle) -> Plan:
        """This plan with ``paths`` sent rather than copied from a release on the node."""
        drop = set(paths) & set(self.link)
        send = sorted([*self.send, *(bundle.files[p] for p in drop)], key=lambda f: f.path)
        return Plan(send, {p: src for p, src in self.link.items() if p not in drop})


def _trusted_sources(probe: dict[str, Any]) -> dict[tuple[str, str], tuple[str, str]]:
    """(sha256, mode) -> (release, path) for every node file that can be copied safely:
    listed in its release's manifest and not suspected of local modification."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for key in ("previous", "current"):  # current last: prefer linking from it
        rel = probe.get(key)
        if not rel or not rel.get("files"):
            continue
        suspect = set(rel.get("suspect", []))
        for path, f in rel["files"].items():
            if path not in suspect:
                out[(f["sha256"], f["mode"])] = (rel["id"], path)
    return out


def in_sync(bundle: Bundle, probe: dict[str, Any]) -> bool:
    """The node's current release holds exactly the bundle, untouched."""
    cur = probe.get("current")
    if not cur or cur.get("error") or cur.get("suspect") or cur.get("missing"):
        return False
    return files_digest(cur.get("files") or {}) == bundle.digest


def plan_upload(bundle: Bundle, probe: dict[str, Any]) -> Plan:
    sources = _trusted_sources(probe)
    plan = Plan()
    for path, f in sorted(bundle.files.items()):
        src = sources.get((f.sha256, f"{f.mode:o}"))
        if src is None:
            plan.send.append(f)
        else:
            plan.link[path] = src
    return plan


def check_state(bundle: Bundle, probe: dict[str, Any]) -> dict[str, Any]:
    """Drift of one node against the bundle, from a hash-mode probe. States, worst first:
    missing (nothing deployed / current broken), modified on node (files differ from the node's
    own MANIFEST), stale (the node's release is not this bundle), in sync."""
    cur = probe.get("current")
    value: dict[str, Any] = {"release": cur.get("id") if cur else None,
                             "leftovers": probe.get("leftovers", [])}
    if not cur:
        value.update(state="missing", detail="nothing deployed")
        return value
    if cur.get("error"):
        value.update(state="missing", detail=cur["error"])
        return value
    value["revision"] = short_rev(cur.get("revision"), cur.get("dirty"))
    modified = sorted(set(cur.get("modified", [])) | set(cur.get("missing", [])))
    node_files = cur.get("files") or {}
    want = {p: f.entry() for p, f in bundle.files.items()}
    stale = sorted(p for p in set(want) | set(node_files)
                   if want.get(p) != node_files.get(p))
    value["modified"] = modified
    value["stale"] = stale
    if modified:
        value.update(state="modified on node", detail=_some(modified))
    elif stale:
        value.update(state="stale", detail=f"{plural(len(stale), 'file differs', 'files differ')}"
                     f": {_some(stale)}")
    else:
        value.update(state="in sync", detail="")
    if value["leftovers"]:
        extra = f"leftover {', '.join(value['leftovers'])}"
        value["detail"] = f"{value['detail']}; {extra}" if value["detail"] else extra
    return value


def _some(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f" (+{len(paths) - n})" if len(paths) > n else "")


def sh_probe_command(workdir: str) -> str:
    """The read-only sh probe of ``workdir``, as one remote command (no second shell)."""
    return nodeside.shell("probe", workdir)


def parse_sh_probe(text: str) -> dict[str, Any]:
    """probe.sh's output -> the same shape as the python agent's stat probe."""
    res: dict[str, Any] = {"leftovers": [], "cleaned": [], "current": None, "previous": None}
    rels: dict[str, dict[str, Any]] = {}
    lines = text.split("\n")
    if text.strip() and "@done" not in lines:
        raise NodeError("probe output cut short")
    mode, key, buf = "", "", []
    sets: dict[tuple[str, str], set[str]] = {}
    for line in lines:
        if mode == "manifest":
            if line == "@end":
                try:
                    man = json.loads("\n".join(buf))
                    rels[key].update({k: man.get(k) for k in (
                        "release", "digest", "revision", "dirty", "deployed_at", "deployed_by",
                        "labkit_version")}, files=dict(man["files"]))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    rels[key]["error"] = f"unreadable MANIFEST in {rels[key]['id']} ({e})"
                mode, buf = "", []
            else:
                buf.append(line)
            continue
        if line.startswith("./") and mode in ("new", "files"):
            sets[(key, mode)].add(line[2:])
        elif line.startswith("@leftover "):
            res["leftovers"].append(line.split(" ", 1)[1])
        elif line.startswith("@release "):
            _, key, rid = line.split(" ", 2)
            rels[key] = {"id": rid, "files": None}
        elif line.startswith(("@manifest ", "@new ", "@files ", "@nostat ")):
            word, key = line[1:].split(" ", 1)
            mode = word
            sets.setdefault((key, word), set())
    for key, rel in rels.items():
        files = rel.get("files")
        if files is None and not rel.get("error"):
            rel["error"] = f"release {rel['id']} has no MANIFEST (or is gone)"
        if files:
            present = sets.get((key, "files"), set())
            if (key, "nostat") in sets:
                suspect = set(files)
            else:
                suspect = sets.get((key, "new"), set()) | (set(files) - present)
            rel["suspect"] = sorted(p for p in suspect if p in files)
        res[key] = rel
    return res
