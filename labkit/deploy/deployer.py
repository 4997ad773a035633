"""The Deployer: one deploy, check or rollback over many nodes through THE fan-out; per node one
connection, one probe and (when something changed) one stage command.

    deploy    probe.sh (read-only) -> in sync? done (a ``clean`` under the lock if leftovers)
              -> else plan -> stage.py ``stage`` with the changed files streamed on its stdin
    check     stage.py ``probe ... hash``: every file of current hashed on the node
    rollback  stage.py ``rollback``: swap current and previous under the lock
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit import nodeside
from labkit.config import Settings
from labkit.deploy.bundle import (
    CHUNK,
    Bundle,
    BundleFile,
    bundle_paths,
    collect_bundle,
    human_bytes,
    new_release_id,
)
from labkit.deploy.plan import (
    Plan,
    check_state,
    in_sync,
    parse_sh_probe,
    plan_upload,
    sh_probe_command,
)
from labkit.errors import LabkitError, NodeError, UserError
from labkit.fanout import Outcome, fan_out
from labkit.inventory import Node
from labkit.nodeside.stage import PYTHON_CHECK
from labkit.ssh.errors import exit_text, last_error_line
from labkit.ssh.shell import RunResult
from labkit.ssh.stream import ACK_EVERY, exec_streaming
from labkit.text import plural

if TYPE_CHECKING:
    from labkit.ssh.shell import RemoteShell

DEFAULT_WORKDIR = "labkit"
COLUMNS = ("release", "uploaded", "state")
CHECK_COLUMNS = ("release", "revision", "state", "detail")

Connect = Callable[[Node], "RemoteShell"]


def remote_workdir(node: Node) -> str:
    return (node.ssh.workdir if node.ssh and node.ssh.workdir else DEFAULT_WORKDIR)


def agent_command(op: str, workdir: str, *args: str, fast: bool = False) -> str:
    """The shell command running the stage agent (``labkit/nodeside/stage.py``). ``fast``
    prefers a real interpreter binary over whatever ``python3`` is on PATH (a pyenv shim costs
    ~100 ms per start, most of an unchanged redeploy). The stage step keeps PATH's python3
    because its build check must judge the payloads with the interpreter they will run
    under."""
    return nodeside.command("stage", op, workdir, *args, fast=fast)


# --- talking to one node -------------------------------------------------------------------

class Transfer:
    """Counts the bytes written to a node; lets tests and the bench see progress."""

    def __init__(self) -> None:
        self.bytes = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n


def _decode(node: Node, res: RunResult, what: str) -> dict[str, Any]:
    """The agent's JSON answer, or a NodeError that says what went wrong in one line."""
    text = res.stdout.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    if res.timed_out:
        raise NodeError(f"{node.name}: {what} timed out after {res.seconds:.0f}s")
    if isinstance(data, dict) and data.get("error"):
        raise NodeError(f"{data['error']}",
                        value={k: v for k, v in data.items() if k != "error"})
    if res.exit_code != 0 or not isinstance(data, dict):
        raise _failed(what, res)
    return data


def _failed(what: str, res: RunResult) -> NodeError:
    """A remote command that did not answer: ``<what> failed: exit code N: <last stderr
    line>``, worded like every other task's (``exit_text``); the last line of stdout stands in
    when stderr is empty."""
    if res.timed_out:
        return NodeError(f"{what} timed out after {res.seconds:.0f}s")
    if res.exit_code is None:
        return NodeError(f"{what} interrupted: connection lost after {res.seconds:.1f}s "
                         "(node powered off or rebooted?); the node keeps its previous release")
    said = res.stderr if last_error_line(res.stderr) else res.stdout
    hint = " (is python3 installed on the node?)" if res.exit_code == 127 else ""
    return NodeError(f"{what} failed: {exit_text(res.exit_code, said)}{hint}")


def _unchanged(f: BundleFile, fd: int) -> None:
    """Raise unless the open source of ``f`` is as it was when the bundle hashed it: the node
    trusts what it receives by stat from then on, so bytes the MANIFEST does not promise must
    never reach it."""
    st = os.fstat(fd)
    if f.stamp is not None and (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != f.stamp:
        raise LabkitError(f"{f.source} changed while being deployed; nothing switched, "
                          "deploy again")


def _stream(plan: Plan, header: bytes, counter: Transfer | None) -> Iterator[bytes]:
    yield header
    for f in plan.send:
        with open(f.source, "rb") as fh:
            _unchanged(f, fh.fileno())
            left = f.size
            while left:
                b = fh.read(min(CHUNK, left))
                if not b:
                    raise LabkitError(f"{f.source} shrank while being deployed")
                left -= len(b)
                if counter:
                    counter.add(len(b))
                if not left:  # before the last bytes go: a write during the read shows here
                    _unchanged(f, fh.fileno())
                yield b


@dataclass
class Deployer:
    """One deploy/check/rollback run over many nodes: the bundle is read and hashed once, the
    per-node work goes through THE fan-out."""

    settings: Settings
    bundle: Bundle | None = None
    build: str | None = PYTHON_CHECK
    connect: Connect | None = None
    lock_wait: float = 30.0
    # the node gives up on a controller silent this long (and frees its lock for the next deploy)
    stall_timeout: float = 20.0
    fsync: bool = True
    counter: Transfer = field(default_factory=Transfer)
    _release: str | None = None

    # -- connections --

    def _with_client(self, node: Node,
                     fn: Callable[[RemoteShell], dict[str, Any]]) -> dict[str, Any]:
        """``fn`` on the node's shell: a supplied connector (a pool) wins, else a connection
        of our own for this call."""
        if self.connect is not None:
            return fn(self.connect(node))
        if node.ssh is None:
            raise NodeError("no ssh: section in the inventory for this node")
        from labkit.ssh.client import SshClient

        with SshClient.connect(node, self.settings) as client:
            return fn(client)

    def _run(self, client: RemoteShell, node: Node, cmd: str, what: str,
             timeout: float) -> dict[str, Any]:
        return _decode(node, client.run(cmd, timeout=timeout), what)

    # -- deploy --

    @property
    def release(self) -> str:
        if self._release is None:
            assert self.bundle is not None
            self._release = new_release_id(self.bundle)
        return self._release

    def deploy_node(self, node: Node) -> dict[str, Any]:
        assert self.bundle is not None
        bundle = self.bundle
        workdir = remote_workdir(node)

        def act(client: RemoteShell) -> dict[str, Any]:
            r = client.run(sh_probe_command(workdir), timeout=self.settings.command_timeout)
            if not r.ok:
                raise _failed("probe", r)
            probe = parse_sh_probe(r.stdout.decode("utf-8", "replace"))
            cur = probe.get("current") or {}
            if in_sync(bundle, probe):
                cleaned: list[str] = []
                if probe["leftovers"]:  # removed under the node's lock, never racing a deploy
                    cleaned = self._run(client, node, agent_command(
                        "clean", workdir, str(self.lock_wait), fast=True), "clean",
                        self.settings.command_timeout).get("cleaned", [])
                note = f"; cleaned {', '.join(cleaned)}" if cleaned else ""
                return {"release": cur.get("id"), "uploaded": plural(0, "file"),
                        "uploaded_files": 0, "uploaded_bytes": 0, "linked": 0, "state": "in sync" + note,
                        "cleaned": cleaned, "revision": cur.get("revision")}
            plan = plan_upload(bundle, probe)
            try:
                res = self._stage(client, node, workdir, plan)
            except NodeError as e:
                # a file kept on the node failed the agent's hash check (edited in place in a
                # way the probe cannot see, e.g. with its mtime put back): send those instead,
                # once — the agent switched nothing
                resend = e.value.get("resend")
                if not resend:
                    raise
                plan = plan.without_links(resend, bundle)
                res = self._stage(client, node, workdir, plan)
            cleaned = res.get("cleaned", [])
            note = f"; cleaned {', '.join(cleaned)}" if cleaned else ""
            return {"release": res["release"], "previous": res.get("previous"),
                    "uploaded": f"{plural(len(plan.send), 'file')}, "
                                f"{human_bytes(plan.send_bytes)}",
                    "uploaded_files": len(plan.send), "uploaded_bytes": plan.send_bytes,
                    "linked": len(plan.link), "state": "deployed" + note, "cleaned": cleaned,
                    "pruned": res.get("pruned", []), "revision": bundle.revision}

        return self._with_client(node, act)

    def _stage(self, client: RemoteShell, node: Node, workdir: str,
               plan: Plan) -> dict[str, Any]:
        """One stage command: the plan line, then the bytes of every file it sends."""
        assert self.bundle is not None
        header = {
            "release": self.release, "lock_wait": self.lock_wait, "fsync": self.fsync,
            "ack_every": ACK_EVERY,
            "build": self.build, "build_timeout": self.settings.command_timeout,
            "link": plan.link,
            "send": [{"path": f.path, "size": f.size, "mode": f"{f.mode:o}"}
                     for f in plan.send],
            "manifest": self.bundle.manifest(self.release),
        }
        head = (json.dumps(header, separators=(",", ":")) + "\n").encode()
        return _decode(node, exec_streaming(
            # the python check must judge the payloads with PATH's python3, the one they
            # will run under; any other build leaves the agent free to start fast
            client, agent_command("stage", workdir, str(self.stall_timeout),
                                  fast=self.build != PYTHON_CHECK),
            _stream(plan, head, self.counter),
            self.settings.command_timeout), "stage")

    def check_node(self, node: Node) -> dict[str, Any]:
        assert self.bundle is not None
        workdir = remote_workdir(node)

        def act(client: RemoteShell) -> dict[str, Any]:
            probe = self._run(client, node, agent_command("probe", workdir, "0", "hash"),
                              "check", self.settings.command_timeout)
            value = check_state(self.bundle, probe)
            if value["state"] != "in sync":
                raise NodeError(f"{value['state']}"
                                + (f": {value['detail']}" if value.get("detail") else ""),
                                value=value)
            return value

        return self._with_client(node, act)

    def rollback_node(self, node: Node) -> dict[str, Any]:
        workdir = remote_workdir(node)

        def act(client: RemoteShell) -> dict[str, Any]:
            res = self._run(client, node, agent_command("rollback", workdir,
                                                        str(self.lock_wait), fast=True),
                            "rollback", self.settings.command_timeout)
            return {"release": res["release"], "previous": res.get("previous"),
                    "state": "rolled back"}

        return self._with_client(node, act)

    # -- over many nodes --

    def run(self, nodes: Sequence[Node], action: str, *, label: str | None = None,
            progress: str | None = None) -> list[Outcome]:
        fn = {"deploy": self.deploy_node, "check": self.check_node,
              "rollback": self.rollback_node}[action]
        if action != "rollback" and self.bundle is None:
            raise UserError("no bundle to deploy")
        return fan_out(nodes, fn, parallel=self.settings.parallel, label=label or action,
                       progress=progress or self.settings.progress)


def build_setting(value: Any) -> str | None:
    """Invoke config ``labkit.deploy_build``: unset -> the python compile check; "" / none /
    false -> no build; anything else -> a shell command run in the new release folder."""
    if value is None:
        return PYTHON_CHECK
    if value is False or str(value).strip().lower() in ("", "none", "false", "off", "no"):
        return None
    return str(value)


def columns_for(action: str) -> tuple[str, ...]:
    return CHECK_COLUMNS if action == "check" else COLUMNS


def deployer_for(settings: Settings, config: Any, inventory: Any, action: str) -> Deployer:
    """A Deployer from Invoke config (``labkit.payloads``, ``labkit.deploy_build``) and the
    inventory; a rollback needs no bundle (it only moves symlinks on the node)."""
    config = config or {}
    build = build_setting(config.get("deploy_build"))
    if action == "rollback":
        return Deployer(settings, None, build=build)
    paths = bundle_paths(config.get("payloads"), getattr(inventory, "payloads", []) or [])
    return Deployer(settings, collect_bundle(paths), build=build)
