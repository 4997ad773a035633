"""One SSH connection to one node: connect (directly or through ProxyJump hosts),
authenticate, and run commands over it.

paramiko underneath, driven through ``Transport`` directly rather than ``SSHClient`` so that
host-key policy, window sizes and every timeout are ours. Windows of 64 MiB and 256 KiB packets:
the migrate-test streams memory images through ``open_exec`` channels and deploy pushes tens of
MiB; paramiko's defaults cap that at a few tens of MiB/s. AES-GCM first: the cheapest cipher per
byte on anything with AES-NI.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import paramiko
import paramiko.agent

from labkit.config import Settings
from labkit.inventory import Node
from labkit.ssh.errors import CommandFailed, SshAuthError, SshError, SshUnreachable, exc_text
from labkit.ssh.hostkeys import check_host_key, known_key_types
from labkit.ssh.process import RemoteProcess, kill_command, wrap
from labkit.ssh.proxy import ProxyProcess
from labkit.ssh.run import CHANNEL_GONE, run_to_end
from labkit.ssh.shell import READ_SIZE, RunResult
from labkit.ssh.target import Target, resolve
from labkit.ssh.transfer import SftpFiles

log = logging.getLogger("labkit.ssh")

WINDOW = 64 * 1024 * 1024
# A command whose output is consumed as it arrives (``run(keep=N)``) gets a smaller window: the
# window is what paramiko buffers when the consumer is slower than the node (a terminal, a
# pipe), and 64 MiB of it (plus its copies) was most of `labkit run`'s memory. 4 MiB still
# streams at GB/s on a LAN.
STREAM_WINDOW = 4 * 1024 * 1024
MAX_PACKET = 256 * 1024
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
MAX_HOPS = 8


class SshClient:
    """One authenticated SSH connection to one node (a ``RemoteShell``). Thread-safe for running
    several commands at once (each gets its own channel); SFTP use is serialised on one cached
    session."""

    def __init__(self, target: Target, settings: Settings, transport: paramiko.Transport,
                 jump: SshClient | None = None, proxy: ProxyProcess | None = None):
        self.target = target
        self.node = target.node
        self.settings = settings
        self.transport = transport
        self._jump = jump
        self._proxy = proxy
        self._files = SftpFiles(self.node, self._open_channel, settings.command_timeout)

    # -- connecting --

    @classmethod
    def connect(cls, node: Node | str, settings: Settings, *,
                ssh_config: Path | None = None, timeout: float | None = None) -> SshClient:
        """Connect and authenticate, checking the host key first. ``timeout`` (default
        settings.ssh_timeout) bounds each of TCP connect, banner, key exchange and auth."""
        target = resolve(node, settings, ssh_config=ssh_config)
        return cls._connect_target(target, settings, ssh_config, timeout)

    @classmethod
    def _connect_target(cls, target: Target, settings: Settings, ssh_config: Path | None,
                        timeout: float | None, depth: int = 0) -> SshClient:
        timeout = settings.ssh_timeout if timeout is None else timeout
        where = f"{target.node}: ssh {target.user}@{target.hostname}:{target.port}"
        jump: SshClient | None = None
        proxy: ProxyProcess | None = None
        sock: Any
        try:
            if target.proxy_jump:
                # OpenSSH's -J a,b: the target is reached through b, and b through a; each
                # hop with its own Host block (keys, known_hosts, user, its own proxy).
                hops = [h.strip() for h in target.proxy_jump.split(",") if h.strip()]
                if depth >= MAX_HOPS:
                    raise SshError(f"{where}: more than {MAX_HOPS} jump hosts (a ProxyJump "
                                   f"loop in the ssh config?)")
                jt = resolve(hops[-1], settings, ssh_config=ssh_config,
                             jump_via=",".join(hops[:-1]) or None)
                jt = replace(jt, node=f"{target.node} (via {hops[-1]})")
                jump = cls._connect_target(jt, settings, ssh_config, timeout, depth + 1)
                try:
                    sock = jump.transport.open_channel(
                        "direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0),
                        window_size=WINDOW, max_packet_size=MAX_PACKET, timeout=timeout)
                except (paramiko.ChannelException, paramiko.SSHException, EOFError) as e:
                    jump.close()
                    text = e.text or e.code if isinstance(e, paramiko.ChannelException) \
                        else exc_text(e)
                    raise SshUnreachable(f"{where}: jump host {hops[-1]} could not connect: "
                                         f"{text}") from None
            elif target.proxy_command:
                proxy = ProxyProcess(target.proxy_command, target.proxy_source, where,
                                     timeout=timeout, fdpass=target.proxy_fdpass)
                sock = proxy.sock
            else:
                sock = socket.create_connection((target.hostname, target.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        except SshError:
            raise
        except OSError as e:
            if jump:
                jump.close()
            err = e.strerror or str(e) or type(e).__name__
            raise SshUnreachable(f"{where}: {err}") from None
        t = paramiko.Transport(sock, default_window_size=WINDOW,
                               default_max_packet_size=MAX_PACKET)
        t.banner_timeout = t.handshake_timeout = t.auth_timeout = timeout
        opts = t.get_security_options()
        opts.ciphers = FAST_CIPHERS + tuple(c for c in opts.ciphers if c not in FAST_CIPHERS)
        try:
            # Prefer the key type we already know for this host, so a server with several
            # host keys does not look "unknown" just because it offered another type first.
            known = known_key_types(target)
            types = [k for k in opts.key_types if k in known]
            if types:
                opts.key_types = tuple(types) + tuple(k for k in opts.key_types
                                                      if k not in types)
            try:
                t.start_client(timeout=timeout)
                # A peer that accepts and then drops the connection (QEMU's port forward to a
                # guest whose sshd is not up yet) can end start_client without an error: the
                # transport is then gone, which is the same "not up yet" as a refusal.
                server_key = t.get_remote_server_key()
            except CHANNEL_GONE as e:
                why = proxy.reason() if proxy else ""
                raise SshUnreachable(f"{where}: handshake failed: {exc_text(e)}{why}") \
                    from None
            check_host_key(target, server_key)
            _authenticate(t, target, where, timeout)
        except BaseException:
            t.close()
            if proxy:
                proxy.close()
            if jump:
                jump.close()
            raise
        t.set_keepalive(30)
        log.debug("%s: connected", where)
        return cls(target, settings, t, jump, proxy)

    @property
    def active(self) -> bool:
        return self.transport.is_active()

    @property
    def broken(self) -> bool:
        """The connection died under us (as opposed to a command ending without an exit
        status). paramiko's transport thread records the socket error or EOF before it closes
        the channels and marks itself inactive only after, so a run loop that saw its channel
        closed by a dying transport reads True here, where ``active`` may still say True."""
        return not self.active or isinstance(self.transport.saved_exception, (EOFError, OSError))

    def close(self) -> None:
        self._files.close()
        self.transport.close()
        if self._proxy is not None:
            self._proxy.close()
        if self._jump is not None:
            self._jump.close()

    def __enter__(self) -> SshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands --

    def _open_channel(self, window: int = WINDOW) -> paramiko.Channel:
        try:
            return self.transport.open_session(window_size=window, max_packet_size=MAX_PACKET,
                                               timeout=self.settings.ssh_timeout)
        except (EOFError, OSError) as e:  # the connection itself is gone
            raise SshUnreachable(f"{self.node}: connection lost: {exc_text(e)}") from None
        except paramiko.SSHException as e:
            raise SshError(f"{self.node}: cannot open a session: {exc_text(e)}") from None

    def open_exec(self, cmd: str, *, env: dict[str, str] | None = None,
                  window: int = WINDOW) -> RemoteProcess:
        """Start ``cmd`` and hand back its channel for streaming (big windows, no buffering of
        our own). The caller reads/writes ``.channel`` and must ``.close()`` (or ``.kill()``)."""
        run_id = uuid.uuid4().hex
        ch = self._open_channel(window)
        try:
            ch.exec_command(wrap(cmd, run_id, env))
        except CHANNEL_GONE as e:
            ch.close()
            raise SshError(f"{self.node}: exec failed: {exc_text(e)}") from None
        return RemoteProcess(self, ch, run_id, cmd)

    def run(self, cmd: str, *, timeout: float | None = None, input: bytes | None = None,
            env: dict[str, str] | None = None,
            on_stdout: Callable[[bytes], None] | None = None,
            on_stderr: Callable[[bytes], None] | None = None,
            cancel: threading.Event | None = None, keep: int | None = None) -> RunResult:
        """Run ``cmd`` to completion, collecting (and optionally streaming) its output.

        ``timeout`` (default settings.command_timeout; 0 = none) kills the remote processes
        and returns ``timed_out=True, exit_code=None``. Setting ``cancel`` (e.g. from a SIGINT
        handler) kills them too and raises KeyboardInterrupt. ``keep=N`` holds only the last N
        bytes of each stream (``RunResult.stdout_truncated``: how many it left out), for a
        caller that consumes the output through ``on_stdout`` / ``on_stderr``."""
        timeout = self.settings.command_timeout if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + timeout if timeout and timeout > 0 else None
        proc = self.open_exec(cmd, env=env, window=WINDOW if keep is None else STREAM_WINDOW)
        return run_to_end(proc, started=t0, deadline=deadline, input=input,
                          on_stdout=on_stdout, on_stderr=on_stderr, cancel=cancel, keep=keep)

    def check(self, cmd: str, **kw: Any) -> RunResult:
        """``run`` that raises CommandFailed (with the output in ``.value``) unless exit 0."""
        r = self.run(cmd, **kw)
        if not r.ok:
            raise CommandFailed(r.failure(self.node), r.to_json())
        return r

    def _kill_run(self, run_id: str) -> None:
        """End every process of one run (by its LABKIT_RUN id), and their process groups, over
        a fresh channel on the same connection. A kill that fails is logged (a warning naming
        node, run and survivors, or why the program could not run: it needs the node's python3
        >= 3.6), never silent: what it leaves behind holds the node's memory and CPU."""
        if self.broken:
            # no connection to kill over: the node's error already says the connection was
            # lost (powered off, rebooted); what runs there is the janitor's to sweep
            log.debug("%s: connection lost; run %s not killed from here", self.node, run_id)
            return
        out, err = bytearray(), bytearray()
        status: int | None = None
        try:
            ch = self._open_channel()
            try:
                ch.exec_command(kill_command(run_id))
                ch.shutdown_write()
                end = time.monotonic() + self.settings.ssh_timeout
                while True:
                    done = ch.exit_status_ready()  # read first: the output comes before it
                    while ch.recv_ready():
                        out += ch.recv(READ_SIZE)
                    while ch.recv_stderr_ready():
                        err += ch.recv_stderr(READ_SIZE)
                    del out[:-KILL_OUTPUT_MAX], err[:-KILL_OUTPUT_MAX]
                    if done or time.monotonic() >= end:
                        break
                    select.select([ch], [], [], 0.1)
                if done:
                    status = ch.recv_exit_status()
            finally:
                ch.close()
        except (SshError, *CHANNEL_GONE) as e:
            # the connection was lost meanwhile: the node's error says so already
            lost = self.broken or isinstance(e, SshUnreachable)
            level = logging.DEBUG if lost else logging.WARNING
            log.log(level, "%s: could not kill run %s: %s", self.node, run_id, exc_text(e))
            return
        problem = kill_problem(status, bytes(out), bytes(err))
        if problem:
            log.warning("%s: could not kill run %s: %s", self.node, run_id, problem)

    # -- files (labkit.ssh.transfer) --

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session (opened once, big window). Not for concurrent use
        from several threads; put_*/get_* serialise on it."""
        return self._files.session()

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644, *,
                  atomic: bool = True) -> None:
        """Write ``data`` to ``remote_path``. Atomic by default: written to a temporary name
        beside it, chmod'ed, then posix-renamed over, so readers never see half a file."""
        self._files.put_bytes(data, remote_path, mode, atomic=atomic)

    def put_file(self, local: str | os.PathLike, remote: str, mode: int | None = None, *,
                 atomic: bool = True) -> None:
        """Upload a local file (mode defaults to the local file's permission bits)."""
        self._files.put_file(local, remote, mode, atomic=atomic)

    def get_bytes(self, remote: str) -> bytes:
        return self._files.get_bytes(remote)

    def get_file(self, remote: str, local: str | os.PathLike) -> None:
        Path(local).write_bytes(self.get_bytes(remote))


KILL_OUTPUT_MAX = 64 * 1024  # of the kill's stdout/stderr kept: one JSON line, an error tail


def kill_problem(status: int | None, stdout: bytes, stderr: bytes) -> str | None:
    """What went wrong with a run's kill (``kill_command``), from its exit status (None: no
    answer in time) and output; None when it ended everything. The program prints
    ``{"killed": [...], "survivors": [...]}`` and exits 0, or 1 with survivors; anything else
    means it did not run (no python3 on the node, too old a one), said on its stderr."""
    if status is None:
        return "the kill did not answer in time"
    survivors: list[int] | None = None
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        try:
            report = json.loads(line)
            survivors = [int(p) for p in report["survivors"]]
            break
        except (ValueError, TypeError, KeyError):
            continue
    if survivors:
        return f"processes {', '.join(map(str, survivors))} survived (exit {status})"
    if status == 0 and survivors is not None:
        return None
    tail = stderr.decode(errors="replace").strip()[-300:] or "no output"
    return f"the kill exited {status}: {tail}"


def _authenticate(t: paramiko.Transport, target: Target, where: str, timeout: float) -> None:
    """Public-key auth as OpenSSH offers keys: each IdentityFile (an encrypted one through the
    agent's copy of it, matched by public key: labkit never asks for a passphrase), then the
    agent's other keys unless IdentitiesOnly."""
    tried: list[str] = []
    keys: list[tuple[str, paramiko.PKey]] = []
    agent = _agent(target, where, timeout)
    try:
        in_agent = {k.asbytes(): k for k in agent.get_keys()} if agent else {}
        mine: set[bytes] = set()
        for path in target.key_files:
            pub = public_blob(path)
            if pub is not None:
                mine.add(pub)
            try:
                keys.append((str(path), paramiko.PKey.from_path(str(path))))
                continue
            except FileNotFoundError:
                tried.append(f"{path} (missing)")
                continue
            except (paramiko.PasswordRequiredException, TypeError) as e:
                if not is_encrypted(path):  # a TypeError of another kind: say what it was
                    tried.append(f"{path} (unreadable: {exc_text(e)})")
                    continue
            except (OSError, paramiko.SSHException, ValueError) as e:
                tried.append(f"{path} (unreadable: {type(e).__name__})")
                continue
            if pub is not None and pub in in_agent:
                keys.append((f"{path} (from ssh-agent)", in_agent[pub]))
            elif agent is None:
                tried.append(f"{path} (encrypted; load it into ssh-agent: ssh-add {path})")
            else:
                why = "" if pub is not None else ", and no .pub beside it to find it by"
                tried.append(f"{path} (encrypted and not in ssh-agent{why}; ssh-add {path})")
        if not target.identities_only:
            keys += [(f"ssh-agent key {k.get_name()} {k.comment or ''}".rstrip(), k)
                     for b, k in in_agent.items() if b not in mine]
        for label, key in keys:
            try:
                t.auth_publickey(target.user, key)
            except paramiko.BadAuthenticationType as e:
                raise SshAuthError(f"{where}: server allows only {', '.join(e.allowed_types)}") \
                    from None
            except paramiko.AuthenticationException:
                tried.append(label)
                continue
            except CHANNEL_GONE as e:
                raise SshUnreachable(f"{where}: connection lost during auth: {exc_text(e)}") \
                    from None
            if t.is_authenticated():
                return
    finally:
        if agent is not None:
            agent._close()
    raise SshAuthError(f"{where}: authentication failed (tried: {', '.join(tried) or 'no keys'})")


def _agent(target: Target, where: str, timeout: float) -> paramiko.agent.AgentSSH | None:
    """The ssh-agent IdentityAgent (or $SSH_AUTH_SOCK) names, or None: none configured, or
    not answering (logged; the keys on disk are still tried). paramiko's ``Agent`` only reads
    $SSH_AUTH_SOCK, so its base class is connected to the socket here."""
    path = target.identity_agent
    if path is None:
        path = os.environ.get("SSH_AUTH_SOCK") or ""
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    agent = paramiko.agent.AgentSSH()
    try:
        conn.connect(path)
        agent._connect(conn)
    except (OSError, paramiko.SSHException) as e:
        conn.close()
        log.warning("%s: ssh-agent at %s does not answer: %s", where, path, exc_text(e))
        return None
    return agent


def public_blob(path: Path) -> bytes | None:
    """A key file's public key without decrypting it: from ``PATH.pub``, else from the file
    itself when it is in OpenSSH's format (its public part is never encrypted)."""
    pub = path.with_name(path.name + ".pub")
    try:
        fields = pub.read_text().split()
        return base64.b64decode(fields[1], validate=True)
    except (OSError, IndexError, ValueError, binascii.Error):
        pass
    body = _openssh_body(path)
    if body is None:
        return None
    try:
        m = paramiko.Message(body[len(OPENSSH_MAGIC):])
        m.get_string(), m.get_string(), m.get_string()  # cipher, kdf, kdf options
        if m.get_int() < 1:
            return None
        return m.get_binary()
    except Exception:  # a truncated or foreign file: no public key to be had
        return None


OPENSSH_MAGIC = b"openssh-key-v1\0"


def _openssh_body(path: Path) -> bytes | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    begin, end = "-----BEGIN OPENSSH PRIVATE KEY-----", "-----END OPENSSH PRIVATE KEY-----"
    if begin not in text or end not in text:
        return None
    try:
        body = base64.b64decode("".join(text.split(begin, 1)[1].split(end, 1)[0].split()))
    except (binascii.Error, ValueError):
        return None
    return body if body.startswith(OPENSSH_MAGIC) else None


def is_encrypted(path: Path) -> bool:
    """Whether a private key file needs a passphrase (OpenSSH format: its cipher is not
    "none"; PEM: an ENCRYPTED header)."""
    body = _openssh_body(path)
    if body is not None:
        try:
            return paramiko.Message(body[len(OPENSSH_MAGIC):]).get_string() != b"none"
        except Exception:
            return False
    try:
        head = path.read_text(errors="replace")[:4096]
    except OSError:
        return False
    return "ENCRYPTED" in head
