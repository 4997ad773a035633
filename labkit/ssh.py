"""The controller's SSH layer: connections, host keys, ssh_config, run, put/get, streaming.

paramiko underneath, driven through ``Transport`` directly rather than ``SSHClient`` so that
host-key policy, window sizes and every timeout are ours:

* Host keys are checked against known_hosts (the node's ``ssh.known_hosts`` or
  ``~/.ssh/known_hosts``). An unknown key is refused unless trust-on-first-use is on (then it is
  appended); a CHANGED key is always refused, naming the node and both SHA256 fingerprints.
  Never Fabric's auto-add.
* ``~/.ssh/config`` is honoured (Host aliases, HostName, User, Port, IdentityFile, ProxyJump,
  UserKnownHostsFile); the inventory's ``ssh:`` block wins where it says something.
* Remote commands run as ``exec env LABKIT_RUN=<id> LABKIT_CTL=<host>:<pid>:<start> ...
  /bin/sh -c CMD``. The id is the handle to kill the command later: a timeout or Ctrl-C sends a
  second exec that SIGKILLs every process whose environment carries the id, plus their process
  groups — which also catches children that ``setsid`` away from the group. Works on real nodes,
  PythonSshNode and OpenSshNode alike. LABKIT_CTL names the controller process that started it
  (host, pid, and the pid's start time so a reused pid does not look alive): after a controller
  SIGKILL a real sshd leaves such processes running, and ``labkit.janitor`` finds them by it.
* Windows of 64 MiB and 256 KiB packets: the migrate-test streams memory images through
  ``open_exec`` channels and deploy pushes tens of MiB; paramiko's defaults cap that at a few
  tens of MiB/s.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import getpass
import hashlib
import logging
import os
import select
import shlex
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paramiko

from labkit.config import Settings
from labkit.errors import LabkitError, NodeError, RetryableError
from labkit.inventory import Node, SshSpec
from labkit.retry import RetryPolicy

log = logging.getLogger("labkit.ssh")

WINDOW = 64 * 1024 * 1024
MAX_PACKET = 256 * 1024
CHUNK = 256 * 1024
SFTP_CHUNK = 128 * 1024   # below OpenSSH sftp-server's 256 KiB message cap, 4x paramiko's 32 KiB
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
RUN_VAR = "LABKIT_RUN"
CTL_VAR = "LABKIT_CTL"
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")


# --- errors --------------------------------------------------------------------------------

class SshError(NodeError):
    """An SSH connection or operation to one node failed."""


class SshUnreachable(SshError, RetryableError):
    """Refused / reset / timed out / no banner: what a booting node looks like; retryable."""


class HostKeyError(SshError):
    """Unknown or changed host key. Never retried: it will not fix itself."""


class SshAuthError(SshError):
    """The node answered but refused every key we offered."""


class CommandFailed(NodeError):
    """A remote command exited non-zero or timed out; ``value`` carries its RunResult fields so
    the fan-out outcome keeps exit code and output."""

    def __init__(self, message: str, value: dict[str, Any]):
        super().__init__(message, value=value)


# --- results -------------------------------------------------------------------------------

@dataclass
class RunResult:
    exit_code: int | None      # None when timed out / killed before an exit status came back
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code,
                "stdout": self.stdout.decode(errors="replace"),
                "stderr": self.stderr.decode(errors="replace"),
                "timed_out": self.timed_out}


# --- where and how to connect --------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Everything needed to reach one node, after merging ssh_config under the inventory."""

    node: str
    hostname: str
    port: int
    user: str
    key_files: tuple[Path, ...]
    known_hosts: Path
    trust_on_first_use: bool
    proxy_jump: str | None = None

    @property
    def known_hosts_name(self) -> str:
        """The host's name in known_hosts: ``host`` on port 22, else ``[host]:port``."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def ssh_config_path() -> Path:
    """``$LABKIT_SSH_CONFIG`` (tests, odd setups) else ``~/.ssh/config``."""
    return Path(os.path.expanduser(os.environ.get("LABKIT_SSH_CONFIG") or "~/.ssh/config"))


def _ssh_config(path: Path | None) -> paramiko.SSHConfig | None:
    path = path or ssh_config_path()
    if not path.is_file():
        return None
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except Exception as e:  # a broken ~/.ssh/config is the user's to fix, say where
        raise LabkitError(f"{path}: cannot parse ssh config: {e}") from None


def resolve(node: Node | str, settings: Settings, *, ssh_config: Path | None = None) -> Target:
    """Merge the inventory's ssh: block over ~/.ssh/config for this node.

    ``SshSpec.port`` defaults to 22, so an inventory port of 22 counts as "not given" and a Port
    from ssh_config applies; any other inventory value wins. A bare string is a host or
    ``user@host:port`` as in ProxyJump (used for jump hosts)."""
    if isinstance(node, str):
        user, host, port = _split_jump(node)
        spec = SshSpec(host=host, port=port or 22, user=user)
        name = node
    else:
        if node.ssh is None:
            raise SshError(f"{node.name}: no ssh: block in the inventory")
        spec, name = node.ssh, node.name
    cfg = _ssh_config(ssh_config)
    c: dict[str, Any] = cfg.lookup(spec.host) if cfg else {}
    hostname = c.get("hostname") or spec.host
    port = spec.port if spec.port != 22 else int(c.get("port", 22))
    user = spec.user or c.get("user") or getpass.getuser()
    if spec.key_file:
        keys: tuple[Path, ...] = (spec.key_file,)
    elif c.get("identityfile"):
        keys = tuple(Path(os.path.expanduser(p)) for p in c["identityfile"])
    else:
        keys = tuple(p for p in (Path.home() / ".ssh" / n for n in DEFAULT_IDENTITIES)
                     if p.exists())
    if spec.known_hosts:
        known = spec.known_hosts
    elif c.get("userknownhostsfile"):
        known = Path(os.path.expanduser(c["userknownhostsfile"].split()[0]))
    else:
        known = Path.home() / ".ssh" / "known_hosts"
    tofu = spec.trust_on_first_use if spec.trust_on_first_use is not None \
        else settings.trust_on_first_use
    jump = spec.proxy_jump or c.get("proxyjump")
    if jump and jump.lower() == "none":
        jump = None
    return Target(node=name, hostname=hostname, port=port, user=user, key_files=keys,
                  known_hosts=known, trust_on_first_use=bool(tofu), proxy_jump=jump)


def _split_jump(s: str) -> tuple[str | None, str, int | None]:
    user = None
    if "@" in s:
        user, s = s.rsplit("@", 1)
    port = None
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = int(p)
    else:
        host = s
    return user, host, port


# --- host keys -----------------------------------------------------------------------------

def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` form, so users can compare with ``ssh-keygen -lf``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_known_lock = threading.Lock()


def _load_known(path: Path) -> paramiko.HostKeys:
    hk = paramiko.HostKeys()
    if path.is_file():
        try:
            hk.load(str(path))
        except (OSError, paramiko.SSHException) as e:
            raise SshError(f"{path}: cannot read known_hosts: {e}") from None
    return hk


def check_host_key(target: Target, key: paramiko.PKey) -> None:
    """Refuse unknown keys (unless TOFU, which records them) and, always, changed ones."""
    with _known_lock:
        known = _load_known(target.known_hosts).lookup(target.known_hosts_name)
        if known:
            same_type = known.get(key.get_name())
            if same_type is not None and same_type.asbytes() == key.asbytes():
                return
            old = same_type or next(iter(known.values()))
            raise HostKeyError(
                f"{target.node}: host key for {target.known_hosts_name} has CHANGED — "
                f"{target.known_hosts} has {old.get_name()} {fingerprint(old)}, the server "
                f"offers {key.get_name()} {fingerprint(key)}; refusing to connect (if the node "
                f"was reinstalled: ssh-keygen -R '{target.known_hosts_name}' "
                f"-f {target.known_hosts})")
        if not target.trust_on_first_use:
            raise HostKeyError(
                f"{target.node}: unknown host key for {target.known_hosts_name} "
                f"({key.get_name()} {fingerprint(key)}), not in {target.known_hosts}; add it or "
                f"set trust_on_first_use")
        _record(target, key)
        log.info("%s: trusted on first use: %s %s recorded in %s", target.node,
                 key.get_name(), fingerprint(key), target.known_hosts)


def _record(target: Target, key: paramiko.PKey) -> None:
    """Append one known_hosts line under an flock, so parallel connects (threads or processes)
    neither lose lines nor rewrite the file."""
    path = target.known_hosts
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{target.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        existing = f.read()
        if line not in existing:
            if existing and not existing.endswith("\n"):
                f.write("\n")
            f.write(line)


# --- the client ----------------------------------------------------------------------------

def _retryable_os(e: BaseException) -> bool:
    return isinstance(e, (ConnectionError, TimeoutError, socket.timeout, EOFError)) or (
        isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                               errno.ECONNREFUSED, errno.ECONNRESET,
                                               errno.ETIMEDOUT, errno.EPIPE))


class SshClient:
    """One authenticated SSH connection to one node. Thread-safe for running several commands
    at once (each gets its own channel); SFTP use is serialised on one cached session."""

    def __init__(self, target: Target, settings: Settings, transport: paramiko.Transport,
                 jump: SshClient | None = None):
        self.target = target
        self.node = target.node
        self.settings = settings
        self.transport = transport
        self._jump = jump
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lock = threading.RLock()

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
                        timeout: float | None) -> SshClient:
        timeout = settings.ssh_timeout if timeout is None else timeout
        where = f"{target.node}: ssh {target.user}@{target.hostname}:{target.port}"
        jump: SshClient | None = None
        sock: Any
        try:
            if target.proxy_jump:
                hops = [h.strip() for h in target.proxy_jump.split(",") if h.strip()]
                jt = resolve(hops[0], settings, ssh_config=ssh_config)
                jt = replace(jt, node=f"{target.node} (via {hops[0]})",
                             known_hosts=target.known_hosts,
                             trust_on_first_use=target.trust_on_first_use,
                             proxy_jump=",".join(hops[1:]) or None)
                jump = cls._connect_target(jt, settings, ssh_config, timeout)
                try:
                    sock = jump.transport.open_channel(
                        "direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0),
                        window_size=WINDOW, max_packet_size=MAX_PACKET, timeout=timeout)
                except paramiko.ChannelException as e:
                    jump.close()
                    raise SshUnreachable(f"{where}: jump host {hops[0]} could not connect: "
                                         f"{e.text or e.code}") from None
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
        # Prefer the key type we already know for this host, so a server with several host
        # keys does not look "unknown" just because it offered another type first.
        known = _load_known(target.known_hosts).lookup(target.known_hosts_name)
        if known:
            types = [k for k in opts.key_types if k in known.keys()]
            if types:
                opts.key_types = tuple(types) + tuple(k for k in opts.key_types
                                                      if k not in types)
        try:
            try:
                t.start_client(timeout=timeout)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise SshUnreachable(f"{where}: handshake failed: {_exc_text(e)}") from None
            check_host_key(target, t.get_remote_server_key())
            _authenticate(t, target, where)
        except BaseException:
            t.close()
            if jump:
                jump.close()
            raise
        t.set_keepalive(30)
        log.debug("%s: connected", where)
        return cls(target, settings, t, jump)

    @property
    def active(self) -> bool:
        return self.transport.is_active()

    def close(self) -> None:
        with self._sftp_lock:
            if self._sftp is not None:
                try:
                    self._sftp.close()
                except Exception:
                    pass
                self._sftp = None
        self.transport.close()
        if self._jump is not None:
            self._jump.close()

    def __enter__(self) -> SshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands --

    def _open_channel(self) -> paramiko.Channel:
        try:
            return self.transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET,
                                               timeout=self.settings.ssh_timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshError(f"{self.node}: cannot open a session: {_exc_text(e)}") from None

    def open_exec(self, cmd: str, *, env: dict[str, str] | None = None) -> RemoteProcess:
        """Start ``cmd`` and hand back its channel for streaming (big windows, no buffering of
        our own). The caller reads/writes ``.channel`` and must ``.close()`` (or ``.kill()``)."""
        run_id = uuid.uuid4().hex
        ch = self._open_channel()
        try:
            ch.exec_command(_wrap(cmd, run_id, env))
        except (paramiko.SSHException, EOFError, OSError) as e:
            ch.close()
            raise SshError(f"{self.node}: exec failed: {_exc_text(e)}") from None
        return RemoteProcess(self, ch, run_id, cmd)

    def run(self, cmd: str, *, timeout: float | None = None, input: bytes | None = None,
            env: dict[str, str] | None = None,
            on_stdout: Callable[[bytes], None] | None = None,
            on_stderr: Callable[[bytes], None] | None = None,
            cancel: threading.Event | None = None) -> RunResult:
        """Run ``cmd`` to completion, collecting (and optionally streaming) its output.

        ``timeout`` (default settings.command_timeout; 0 = none) kills the remote processes
        and returns ``timed_out=True, exit_code=None``. Setting ``cancel`` (e.g. from a SIGINT
        handler) kills them too and raises KeyboardInterrupt."""
        timeout = self.settings.command_timeout if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + timeout if timeout and timeout > 0 else None
        proc = self.open_exec(cmd, env=env)
        ch = proc.channel
        feeder = None
        if input:
            def feed() -> None:
                try:
                    ch.sendall(input)
                    ch.shutdown_write()
                except (OSError, EOFError, paramiko.SSHException):
                    pass
            feeder = threading.Thread(target=feed, daemon=True, name=f"stdin-{self.node}")
            feeder.start()
        else:
            try:
                ch.shutdown_write()  # like `ssh -n`: the command reads EOF, never hangs on stdin
            except (OSError, EOFError, paramiko.SSHException):
                proc.close()
                raise SshError(f"{self.node}: connection lost while starting {cmd!r}") from None
        out: list[bytes] = []
        err: list[bytes] = []
        timed_out = False
        try:
            while True:
                got = False
                while ch.recv_ready():
                    data = ch.recv(CHUNK)
                    if not data:
                        break
                    got = True
                    out.append(data)
                    if on_stdout:
                        on_stdout(data)
                while ch.recv_stderr_ready():
                    data = ch.recv_stderr(CHUNK)
                    if not data:
                        break
                    got = True
                    err.append(data)
                    if on_stderr:
                        on_stderr(data)
                if got:
                    continue
                if (ch.eof_received and ch.exit_status_ready()) or ch.closed:
                    break
                if not self.transport.is_active():
                    raise SshError(f"{self.node}: connection lost while running {cmd!r}")
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    timed_out = True
                    proc.kill()
                    break
                wait = 0.05 if ch.eof_received else 0.25
                if deadline is not None:
                    wait = min(wait, deadline - now)
                select.select([ch], [], [], max(0.0, wait))
        except BaseException:
            proc.kill()
            raise
        finally:
            ch.close()
        code = None if timed_out else (ch.recv_exit_status() if ch.exit_status_ready() else None)
        if code == -1:
            code = None  # exit-signal or no status at all
        return RunResult(code, b"".join(out), b"".join(err), time.monotonic() - t0, timed_out)

    def check(self, cmd: str, **kw: Any) -> RunResult:
        """``run`` that raises CommandFailed (with the output in ``.value``) unless exit 0."""
        r = self.run(cmd, **kw)
        if not r.ok:
            raise CommandFailed(_failure_text(self.node, cmd, r), r.to_json())
        return r

    def _kill_run(self, run_id: str) -> None:
        """SIGKILL every process of one run (by its LABKIT_RUN id), and their process groups,
        over a fresh channel on the same connection."""
        script = (
            "i=0; while [ $i -lt 20 ]; do "
            f"p=$(grep -lzx '{RUN_VAR}={run_id}' /proc/[0-9]*/environ 2>/dev/null "
            "| cut -d/ -f3); "
            '[ -z "$p" ] && exit 0; '
            "for x in $p; do kill -KILL -- -$x 2>/dev/null; kill -KILL $x 2>/dev/null; done; "
            "i=$((i+1)); done")
        try:
            ch = self._open_channel()
            try:
                ch.exec_command(script)
                ch.shutdown_write()
                end = time.monotonic() + self.settings.ssh_timeout
                while not ch.exit_status_ready() and time.monotonic() < end:
                    select.select([ch], [], [], 0.1)
                    while ch.recv_ready():
                        ch.recv(CHUNK)
                    while ch.recv_stderr_ready():
                        ch.recv_stderr(CHUNK)
            finally:
                ch.close()
        except (SshError, OSError, EOFError, paramiko.SSHException) as e:
            log.warning("%s: could not kill run %s: %s", self.node, run_id, _exc_text(e))

    # -- files --

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session (opened once, big window). Not for concurrent use
        from several threads; put_*/get_* serialise on it."""
        with self._sftp_lock:
            if self._sftp is None or self._sftp.sock.closed:
                try:
                    ch = self._open_channel()
                    ch.invoke_subsystem("sftp")
                    self._sftp = paramiko.SFTPClient(ch)
                except (paramiko.SSHException, EOFError, OSError) as e:
                    raise SshError(f"{self.node}: cannot start sftp: {_exc_text(e)}") from None
                self._sftp.get_channel().settimeout(self.settings.command_timeout)
            return self._sftp

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644, *,
                  atomic: bool = True) -> None:
        """Write ``data`` to ``remote_path``. Atomic by default: written to a temporary name
        beside it, chmod'ed, then posix-renamed over, so readers never see half a file."""
        self._put(lambda f: _write_all(f, memoryview(data)), remote_path, mode, atomic)

    def put_file(self, local: str | os.PathLike, remote: str, mode: int | None = None, *,
                 atomic: bool = True) -> None:
        """Upload a local file (mode defaults to the local file's permission bits)."""
        local = Path(local)
        if mode is None:
            mode = stat.S_IMODE(local.stat().st_mode)

        def body(f: paramiko.SFTPFile) -> None:
            with open(local, "rb") as src:
                while chunk := src.read(4 * 1024 * 1024):
                    _write_all(f, memoryview(chunk))

        self._put(body, remote, mode, atomic)

    def _put(self, body: Callable[[paramiko.SFTPFile], None], remote: str, mode: int,
             atomic: bool) -> None:
        with self._sftp_lock:
            sftp = self.sftp()
            tmp = f"{remote}.labkit-tmp-{uuid.uuid4().hex[:8]}" if atomic else remote
            try:
                with sftp.open(tmp, "wb", bufsize=0) as f:
                    f.set_pipelined(True)
                    f.MAX_REQUEST_SIZE = SFTP_CHUNK
                    body(f)
                sftp.chmod(tmp, mode)
                if atomic:
                    sftp.posix_rename(tmp, remote)
            except (OSError, EOFError, paramiko.SSHException) as e:
                if atomic:
                    try:
                        sftp.remove(tmp)
                    except (OSError, EOFError, paramiko.SSHException):
                        pass
                raise SshError(f"{self.node}: upload to {remote} failed: {_exc_text(e)}") \
                    from None

    def get_bytes(self, remote: str) -> bytes:
        with self._sftp_lock:
            sftp = self.sftp()
            try:
                with sftp.open(remote, "rb", bufsize=0) as f:
                    f.MAX_REQUEST_SIZE = SFTP_CHUNK
                    size = f.stat().st_size
                    f.prefetch(size)
                    # read in request-sized pieces: f.read() walks 8 KiB at a time through
                    # the prefetch table (quadratic), and grows one bytes object
                    parts = []
                    got = 0
                    while got < size:
                        data = f.read(min(SFTP_CHUNK, size - got))
                        if not data:
                            break
                        parts.append(data)
                        got += len(data)
                    return b"".join(parts)
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise SshError(f"{self.node}: download of {remote} failed: {_exc_text(e)}") \
                    from None

    def get_file(self, remote: str, local: str | os.PathLike) -> None:
        Path(local).write_bytes(self.get_bytes(remote))


def _write_all(f: paramiko.SFTPFile, view: memoryview) -> None:
    # One SFTP write request per SFTP_CHUNK: handing paramiko a big buffer makes it re-slice
    # (copy) the remainder after every request, quadratic in the buffer size.
    for i in range(0, len(view), SFTP_CHUNK):
        f.write(bytes(view[i:i + SFTP_CHUNK]))


class RemoteProcess:
    """A command started with ``open_exec``: stream over ``.channel``; ``kill()`` ends every
    process of it on the node (process groups and setsid'd children included)."""

    def __init__(self, client: SshClient, channel: paramiko.Channel, run_id: str, cmd: str):
        self.client = client
        self.channel = channel
        self.run_id = run_id
        self.cmd = cmd
        self._killed = False

    def kill(self) -> None:
        if not self._killed:
            self._killed = True
            self.client._kill_run(self.run_id)

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit status, or None if it did not come within ``timeout``."""
        if self.channel.status_event.wait(timeout):
            code = self.channel.recv_exit_status()
            return None if code == -1 else code
        return None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.kill()
        self.close()


_ctl: tuple[int, str] | None = None


def proc_start_time(pid: int | str = "self") -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None (no such
    process, or no /proc: then only the pid can be checked)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'
    fields = data[data.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else None


def controller_tag() -> str:
    """``host:pid:start`` of this controller process (LABKIT_CTL). Recomputed after a fork."""
    global _ctl
    pid = os.getpid()
    if _ctl is None or _ctl[0] != pid:
        host = socket.gethostname() or "localhost"
        _ctl = (pid, f"{host}:{pid}:{proc_start_time() or 0}")
    return _ctl[1]


def _wrap(cmd: str, run_id: str, env: dict[str, str] | None) -> str:
    """``exec env LABKIT_RUN=ID LABKIT_CTL=HOST:PID:START K=V /bin/sh -c CMD``: env vars without
    needing the server to AcceptEnv, a marker in every descendant's environment for
    ``_kill_run``, and who started it, for ``labkit.janitor``."""
    assigns = [f"{RUN_VAR}={run_id}", shlex.quote(f"{CTL_VAR}={controller_tag()}")]
    for k, v in (env or {}).items():
        if not k.replace("_", "a").isalnum() or k[0].isdigit():
            raise LabkitError(f"bad environment variable name {k!r}")
        assigns.append(shlex.quote(f"{k}={v}"))
    return f"exec env {' '.join(assigns)} /bin/sh -c {shlex.quote(cmd)}"


def _authenticate(t: paramiko.Transport, target: Target, where: str) -> None:
    tried: list[str] = []
    keys: list[tuple[str, paramiko.PKey]] = []
    for path in target.key_files:
        try:
            keys.append((str(path), paramiko.PKey.from_path(str(path))))
        except paramiko.PasswordRequiredException:
            tried.append(f"{path} (encrypted: load it into ssh-agent)")
        except FileNotFoundError:
            tried.append(f"{path} (missing)")
        except (OSError, paramiko.SSHException, ValueError) as e:
            tried.append(f"{path} (unreadable: {type(e).__name__})")
    if os.environ.get("SSH_AUTH_SOCK"):
        try:
            for i, k in enumerate(paramiko.Agent().get_keys()):
                keys.append((f"agent key {i + 1}", k))
        except (paramiko.SSHException, OSError):
            pass
    for label, key in keys:
        try:
            t.auth_publickey(target.user, key)
        except paramiko.BadAuthenticationType as e:
            raise SshAuthError(f"{where}: server allows only {', '.join(e.allowed_types)}") \
                from None
        except paramiko.AuthenticationException:
            tried.append(label)
            continue
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshUnreachable(f"{where}: connection lost during auth: {_exc_text(e)}") \
                from None
        if t.is_authenticated():
            return
    raise SshAuthError(f"{where}: authentication failed (tried: {', '.join(tried) or 'no keys'})")


def _exc_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _failure_text(node: str, cmd: str, r: RunResult) -> str:
    if r.timed_out:
        return f"{node}: timed out after {r.seconds:.1f}s (remote processes killed)"
    if r.exit_code is None:
        return f"{node}: no exit status (killed or connection lost)"
    return f"{node}: exit code {r.exit_code}"


# --- pool ----------------------------------------------------------------------------------

@dataclass
class ConnectionPool:
    """One connection per node within a run, shared by threads; reconnects a dead one."""

    settings: Settings
    ssh_config: Path | None = None
    _clients: dict[str, SshClient] = field(default_factory=dict)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, node: Node) -> SshClient:
        with self._lock:
            lock = self._locks.setdefault(node.name, threading.Lock())
        with lock:
            c = self._clients.get(node.name)
            if c is not None and c.active:
                return c
            if c is not None:
                c.close()
            c = SshClient.connect(node, self.settings, ssh_config=self.ssh_config)
            self._clients[node.name] = c
            return c

    def drop(self, node: Node | str) -> None:
        """Forget (and close) a node's connection, e.g. after powering it off."""
        name = node if isinstance(node, str) else node.name
        with self._lock:
            c = self._clients.pop(name, None)
        if c is not None:
            c.close()

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()


# --- waiting for a booting node ------------------------------------------------------------

def console_tail(path: Path | None, lines: int = 5, max_chars: int = 400) -> str:
    """Last lines of a console log, for an error message (``|``-joined, one line)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return tail_text(text, lines, max_chars)


def tail_text(text: str, lines: int = 5, max_chars: int = 400) -> str:
    """The last non-empty lines of console output as one ``|``-joined line."""
    kept = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-max_chars:]


def fake_console_log(node: Node, state_dir: Path | None) -> Path | None:
    """Where the fake lab keeps a node's console (``state_dir/console/NAME.log``)."""
    return None if state_dir is None else Path(state_dir) / "console" / f"{node.name}.log"


def wait_ssh(node: Node, settings: Settings, deadline: float, *,
             console_log: Path | None = None, ssh_config: Path | None = None,
             on_retry: Callable[[int, BaseException, float], None] | None = None) -> None:
    """Wait until the node's SSH accepts and authenticates us, retrying refused/reset/timeout
    (what a booting node looks like) through the retry policy, until ``deadline`` (a
    time.monotonic() value). A host key or auth problem fails at once. On giving up the error
    names the node and carries the tail of ``console_log`` (also in ``.value``)."""
    t0 = time.monotonic()
    policy = RetryPolicy(window=max(0.0, deadline - t0), first_delay=0.2,
                         max_delay=min(2.0, settings.retry_max_delay))

    def attempt() -> None:
        left = deadline - time.monotonic()
        SshClient.connect(node, settings, ssh_config=ssh_config,
                          timeout=max(0.5, min(settings.ssh_timeout, left))).close()

    try:
        policy.call(attempt, retryable=lambda e: isinstance(e, RetryableError),
                    on_retry=on_retry, deadline=deadline)
    except SshUnreachable as e:
        tail = console_tail(console_log)
        msg = f"{node.name}: SSH did not come up within {time.monotonic() - t0:.0f}s ({e})"
        if tail:
            msg += f"; console: {tail}"
        raise SshUnreachable(msg, value={"console_tail": tail}) from None
