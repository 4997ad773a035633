"""Fake lab nodes: an SSH server per node that lives and dies with its fake BMC's power.

Two kinds with one shape (the FakeNode contract in docs/architecture.md):

* ``PythonSshNode`` — pure paramiko, no system sshd needed (``make demo`` on a laptop).
* ``OpenSshNode``   — a real OpenSSH ``sshd -D`` with its own config, so the controller side is
  also tested against an independent SSH implementation.

Both run commands as real processes with the node's root folder as cwd and HOME, and
``LABKIT_NODE=NAME`` plus ``LABKIT_NODE_ROOT=ROOT`` in the environment. ``stop()`` is a power-off:
the port refuses connections and *every* process started through the node dies — tracked process
groups first, then a /proc sweep for anything carrying this node's ``LABKIT_NODE_ROOT`` marker,
which catches ``setsid``/double-forked children that left the group. The root path (not the name)
is the marker because several labs with a ``node1`` may share one machine (parallel test runs).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import stat as stat_mod
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paramiko
from paramiko import (
    SFTP_FAILURE,
    SFTP_OK,
    SFTPAttributes,
    SFTPHandle,
    SFTPServer,
    SFTPServerInterface,
)

# Big windows and packets: paramiko's defaults (2 MiB / 32 KiB) cap a single stream at a few
# tens of MiB/s because of per-packet Python overhead and window-adjust round trips.
WINDOW = 64 * 1024 * 1024
MAX_PACKET = 256 * 1024
READ_CHUNK = 256 * 1024
# Prefer AEAD ciphers: one pass through the cipher instead of cipher + HMAC per packet.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

ENV_NODE = "LABKIT_NODE"
ENV_ROOT = "LABKIT_NODE_ROOT"


# --- helpers shared by both node kinds -----------------------------------------------------

def ensure_host_key(path: Path) -> paramiko.Ed25519Key:
    """Load the node's ed25519 host key, generating it once (kept across restarts, like a real
    node's /etc/ssh). Written atomically so two racing starters cannot leave half a key."""
    path = Path(path)
    if not path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if someone else won the race: keep theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        pub_path = path.with_name(path.name + ".pub")
        if not pub_path.exists():
            pub_path.write_bytes(pub + b"\n")
    return paramiko.Ed25519Key.from_private_key_file(str(path))


def authorized(authorized_keys: Path, key: paramiko.PKey) -> bool:
    """Is ``key`` listed in the authorized_keys file? Re-read on every attempt so a key added
    while the node runs works at once, as with sshd."""
    try:
        lines = Path(authorized_keys).read_text().splitlines()
    except OSError:
        return False
    import base64

    blob = key.asbytes()
    for line in lines:
        parts = line.strip().split()
        if not parts or parts[0].startswith("#"):
            continue
        # tolerate an options prefix: find the "<type> <base64>" pair
        for i in range(len(parts) - 1):
            if parts[i].startswith(("ssh-", "ecdsa-", "sk-", "rsa-")):
                try:
                    if base64.b64decode(parts[i + 1]) == blob:
                        return True
                except ValueError:
                    pass
                break
    return False


def _proc_environ_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return False
    return (b"\0" + env).find(b"\0" + marker + b"\0") >= 0 or env.endswith(b"\0" + marker)


def marked_pids(marker: bytes) -> list[int]:
    """Live processes whose environment carries ``marker`` (e.g. b"LABKIT_NODE_ROOT=/x")."""
    me = os.getpid()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid != me and _proc_environ_has(pid, marker):
            out.append(pid)
    return out


def descendants(root_pid: int) -> list[int]:
    """All descendants of root_pid from a /proc snapshot (used for sshd's per-connection
    children, which do not carry our environment marker)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [root_pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_marked(marker: bytes, extra: list[int] = (), budget: float = 2.0) -> int:
    """SIGKILL ``extra`` pids/groups and every process carrying ``marker``; sweep again until
    nothing is left (a forking process can spawn between two sweeps). Returns how many died."""
    killed = 0
    for pid in extra:
        for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
            try:
                kill(pid)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    end = time.monotonic() + budget
    while True:
        pids = marked_pids(marker)
        if not pids or time.monotonic() > end:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def node_env(name: str, root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a session gets: minimal like sshd's, plus the node markers."""
    user = os.environ.get("USER") or _username()
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(root),
        "USER": user,
        "LOGNAME": user,
        "SHELL": "/bin/sh",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    env.update(extra or {})
    env[ENV_NODE] = name
    env[ENV_ROOT] = str(root)
    return env


def _username() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


# --- the pure-Python node ------------------------------------------------------------------

class _FakeNode:
    """What both kinds of fake node share: identity, paths and the environment marker by which
    everything started through the node is found and killed at power-off."""

    def __init__(self, name: str, root: Path, host: str, port: int, host_key: Path,
                 authorized_keys: Path, log: logging.Logger):
        self.name = name
        self.root = Path(root).resolve()
        self.host = host
        self.port = port
        self.host_key_path = Path(host_key)
        self.authorized_keys = Path(authorized_keys)
        self.log = log
        self.marker = f"{ENV_ROOT}={self.root}".encode()
        self._lock = threading.RLock()


class PythonSshNode(_FakeNode):
    """A fake node served by paramiko in the lab process. Thread-safe; start/stop idempotent."""

    def __init__(self, name: str, root: Path, host: str, port: int, host_key: Path,
                 authorized_keys: Path, log: logging.Logger):
        super().__init__(name, root, host, port, host_key, authorized_keys, log)
        self._listener: socket.socket | None = None
        self._transports: set[paramiko.Transport] = set()
        self._procs: set[subprocess.Popen] = set()
        self._host_key: paramiko.Ed25519Key | None = None
        self._closed = False

    # -- FakeNode contract --

    @property
    def up(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"fake node {self.name} is closed")
            if self._listener is not None:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            if self._host_key is None:
                self._host_key = ensure_host_key(self.host_key_path)
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                 socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError:
                sock.close()
                raise
            sock.listen(128)
            self._listener = sock
            threading.Thread(target=self._accept_loop, args=(sock,), daemon=True,
                             name=f"node-{self.name}-accept").start()
            self.log.info("node %s: ssh listening on %s:%d", self.name, self.host, self.port)

    def stop(self) -> None:
        with self._lock:
            sock, self._listener = self._listener, None
            transports, self._transports = list(self._transports), set()
            procs, self._procs = list(self._procs), set()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in another thread
            except OSError:
                pass
            sock.close()
        for t in transports:
            t.close()
        n = kill_marked(self.marker, [p.pid for p in procs])
        if sock is not None or n:
            self.log.info("node %s: ssh stopped, %d process(es) killed", self.name, n)

    def close(self) -> None:
        self.stop()
        self._closed = True

    # -- internals --

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, addr = sock.accept()
            except OSError:
                return
            with self._lock:
                if self._listener is not sock:  # stopped between accept and here
                    conn.close()
                    return
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                             name=f"node-{self.name}-conn").start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            conn.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        t = paramiko.Transport(conn, default_window_size=WINDOW,
                               default_max_packet_size=MAX_PACKET)
        opts = t.get_security_options()
        opts.ciphers = FAST_CIPHERS + tuple(c for c in opts.ciphers if c not in FAST_CIPHERS)
        t.add_server_key(self._host_key)
        t.set_subsystem_handler("sftp", _SftpServer, _RootedSftp, root=self.root)
        server = _Server(self, t, addr)
        with self._lock:
            if self._listener is None:
                conn.close()
                return
            self._transports.add(t)
        try:
            t.start_server(server=server)
        except (paramiko.SSHException, EOFError, OSError) as e:
            self.log.debug("node %s: handshake from %s failed: %s", self.name, addr, e)
            t.close()
            with self._lock:
                self._transports.discard(t)
            return
        # Accept channels so the queue does not grow; direct-tcpip ones are forwarded
        # (lets a fake node serve as a ProxyJump host). paramiko's transport holds channels
        # only weakly and Channel.__del__ closes them, so sessions are kept referenced here
        # until they close.
        keep: set[paramiko.Channel] = set()
        while t.is_active():
            ch = t.accept(0.5)
            keep = {c for c in keep if not c.closed}
            if ch is None:
                continue
            dest = server.forwards.pop(ch.get_id(), None)
            if dest is not None:
                threading.Thread(target=_forward, args=(ch, dest), daemon=True).start()
            else:
                keep.add(ch)
        with self._lock:
            self._transports.discard(t)

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with self._lock:
            if self._listener is None:
                raise OSError(errno.ECONNABORTED, "node is powering off")
            p = subprocess.Popen(argv, cwd=self.root, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                 start_new_session=True, close_fds=True)
            self._procs.add(p)
        return p

    def _forget(self, p: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(p)


def _forward(ch: paramiko.Channel, dest: tuple[str, int]) -> None:
    try:
        s = socket.create_connection(dest, timeout=10)
    except OSError:
        ch.close()
        return
    s.settimeout(None)

    def up() -> None:
        try:
            while data := ch.recv(READ_CHUNK):
                s.sendall(data)
        except OSError:
            pass
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=up, daemon=True).start()
    try:
        while data := s.recv(READ_CHUNK):
            ch.sendall(data)
    except OSError:
        pass
    ch.close()
    s.close()


class _Server(paramiko.ServerInterface):
    def __init__(self, node: PythonSshNode, transport: paramiko.Transport, addr: Any):
        self.node = node
        self.transport = transport
        self.addr = addr
        self.env: dict[int, dict[str, str]] = {}
        self.forwards: dict[int, tuple[str, int]] = {}

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if authorized(self.node.authorized_keys, key):
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(self, chanid: int, origin: Any,
                                           destination: Any) -> int:
        self.forwards[chanid] = (destination[0], int(destination[1]))
        return paramiko.OPEN_SUCCEEDED

    def check_channel_env_request(self, channel: paramiko.Channel, name: bytes,
                                  value: bytes) -> bool:
        n = name.decode() if isinstance(name, bytes) else name
        v = value.decode() if isinstance(value, bytes) else value
        self.env.setdefault(channel.get_id(), {})[n] = v
        return True

    def check_channel_pty_request(self, *args: Any) -> bool:
        return True  # accepted but no pty: commands see pipes, as with `ssh -T`

    def check_channel_window_change_request(self, *args: Any) -> bool:
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return self._exec(channel, None)

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        cmd = command.decode(errors="surrogateescape") if isinstance(command, bytes) else command
        return self._exec(channel, cmd)

    def _exec(self, channel: paramiko.Channel, command: str | None) -> bool:
        node = self.node
        peer = self.addr if isinstance(self.addr, tuple) else ("127.0.0.1", 0)
        extra = dict(self.env.pop(channel.get_id(), {}))
        extra["SSH_CONNECTION"] = f"{peer[0]} {peer[1]} {node.host} {node.port}"
        if command is not None:
            extra["SSH_ORIGINAL_COMMAND"] = command
        env = node_env(node.name, node.root, extra)
        argv = ["/bin/sh", "-c", command] if command is not None else ["/bin/sh"]
        try:
            p = node._spawn(argv, env)
        except OSError as e:
            node.log.warning("node %s: exec failed: %s", node.name, e)
            return False
        _AfterReply(channel, _Session(node, channel, p).start)
        return True


class _AfterReply:
    """Stand-in for ``channel.transport`` during an exec request: paramiko sends the request's
    success reply only after our check returns, so a fast command (``true``) could otherwise
    send exit-status and CLOSE before it, and the client sees "Channel closed" instead of a
    result. The session's pumps start right after the reply goes out (or after 0.5 s if the
    client asked for no reply)."""

    def __init__(self, channel: paramiko.Channel, callback: Any):
        self._real = channel.transport
        self._channel = channel
        self._callback = callback
        self._once = threading.Lock()
        self._fired = False
        channel.transport = self
        timer = threading.Timer(0.5, self._fire)
        timer.daemon = True
        timer.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _send_user_message(self, m: Any) -> None:
        self._real._send_user_message(m)
        self._fire()

    def _fire(self) -> None:
        with self._once:
            if self._fired:
                return
            self._fired = True
            self._channel.transport = self._real
        self._callback()


class _Session:
    """Pumps one process's stdin/stdout/stderr over its channel; a closed channel kills the
    process group (what a dropped connection or a Ctrl-C on the controller means)."""

    def __init__(self, node: PythonSshNode, channel: paramiko.Channel, proc: subprocess.Popen):
        self.node = node
        self.ch = channel
        self.p = proc

    def start(self) -> None:
        threading.Thread(target=self._stdin, daemon=True).start()
        self._err = threading.Thread(target=self._pump, args=(self.p.stderr, True), daemon=True)
        self._err.start()
        threading.Thread(target=self._main, daemon=True).start()

    def _kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _stdin(self) -> None:
        stdin = self.p.stdin
        try:
            while True:
                data = self.ch.recv(READ_CHUNK)
                if not data:
                    break
                stdin.write(data)
        except (OSError, EOFError):  # EOFError: the connection dropped mid-read
            pass
        try:
            stdin.close()
        except OSError:
            pass
        # Client EOF is normal; a closed channel or dead connection while the process still
        # runs means the controller went away: nothing may survive it.
        while self.p.poll() is None:
            transport = self.ch.get_transport()
            if self.ch.closed or transport is None or not transport.is_active():
                self._kill()
                return
            time.sleep(0.1)

    def _pump(self, f: Any, err: bool) -> None:
        send = self.ch.sendall_stderr if err else self.ch.sendall
        fd = f.fileno()
        try:
            while True:
                data = os.read(fd, READ_CHUNK)
                if not data:
                    break
                send(data)
        except (OSError, EOFError, paramiko.SSHException):
            self._kill()  # channel gone
            # keep draining so the process is never blocked on a full pipe
            try:
                while os.read(fd, READ_CHUNK):
                    pass
            except OSError:
                pass
        finally:
            f.close()

    def _main(self) -> None:
        self._pump(self.p.stdout, False)
        self._err.join()
        rc = self.p.wait()
        self.node._forget(self.p)
        if rc < 0:
            rc = 128 - rc  # killed by a signal: shell convention
        try:
            self.ch.send_exit_status(rc)
            self.ch.shutdown_write()
            self.ch.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass


# --- SFTP rooted at the node's folder ------------------------------------------------------

class _SftpServer(SFTPServer):
    """paramiko's SFTP server, plus the exit status OpenSSH's sftp-server gives when the
    session ends (scp/sftp clients report a missing one as failure)."""

    def start_subsystem(self, name: str, transport: paramiko.Transport,
                        channel: paramiko.Channel) -> None:
        super().start_subsystem(name, transport, channel)
        try:
            channel.send_exit_status(0)
        except (OSError, EOFError, paramiko.SSHException):
            pass


class _Handle(SFTPHandle):
    def stat(self) -> SFTPAttributes | int:
        try:
            return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def chattr(self, attr: SFTPAttributes) -> int:
        try:
            _apply_attrs(self.filename, attr)
            return SFTP_OK
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)


def _apply_attrs(path: str, attr: SFTPAttributes) -> None:
    if attr._flags & attr.FLAG_PERMISSIONS:
        os.chmod(path, stat_mod.S_IMODE(attr.st_mode))
    if attr._flags & attr.FLAG_UIDGID:
        try:
            os.chown(path, attr.st_uid, attr.st_gid)
        except PermissionError:
            pass
    if attr._flags & attr.FLAG_AMTIME:
        os.utime(path, (attr.st_atime, attr.st_mtime))
    if attr._flags & attr.FLAG_SIZE:
        with open(path, "r+b") as f:
            f.truncate(attr.st_size)


class _RootedSftp(SFTPServerInterface):
    """Absolute paths as they are (it is a local fake); relative paths against the node root,
    so ``put("x", "payloads/x")`` lands on the node's disk like on a real node's $HOME."""

    def __init__(self, server: Any, *args: Any, root: Path, **kwargs: Any):
        super().__init__(server, *args, **kwargs)
        self.root = str(root)

    def _p(self, path: str | bytes) -> str:
        if isinstance(path, bytes):
            path = path.decode(errors="surrogateescape")
        return os.path.join(self.root, path) if not os.path.isabs(path) else path

    @staticmethod
    def _err(e: OSError) -> int:
        return SFTPServer.convert_errno(e.errno)

    def canonicalize(self, path: str) -> str:
        return os.path.normpath(self._p(path or "."))

    def list_folder(self, path: str) -> list[SFTPAttributes] | int:
        p = self._p(path)
        try:
            out = []
            for name in os.listdir(p):
                a = SFTPAttributes.from_stat(os.lstat(os.path.join(p, name)))
                a.filename = name
                out.append(a)
            return out
        except OSError as e:
            return self._err(e)

    def stat(self, path: str) -> SFTPAttributes | int:
        try:
            return SFTPAttributes.from_stat(os.stat(self._p(path)))
        except OSError as e:
            return self._err(e)

    def lstat(self, path: str) -> SFTPAttributes | int:
        try:
            return SFTPAttributes.from_stat(os.lstat(self._p(path)))
        except OSError as e:
            return self._err(e)

    def open(self, path: str, flags: int, attr: SFTPAttributes) -> SFTPHandle | int:
        p = self._p(path)
        mode = attr.st_mode if attr is not None and attr.st_mode is not None else 0o666
        try:
            fd = os.open(p, flags | getattr(os, "O_BINARY", 0), stat_mod.S_IMODE(mode))
        except OSError as e:
            return self._err(e)
        if flags & os.O_CREAT and attr is not None:
            attr._flags &= ~attr.FLAG_PERMISSIONS  # mode already applied (modulo umask)
            try:
                _apply_attrs(p, attr)
            except OSError:
                pass
        if flags & os.O_WRONLY:
            fmode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            fmode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            fmode = "rb"
        try:
            f = os.fdopen(fd, fmode, buffering=0)
        except OSError as e:
            os.close(fd)
            return self._err(e)
        h = _Handle(flags)
        h.filename = p
        h.readfile = f
        h.writefile = f
        return h

    def remove(self, path: str) -> int:
        try:
            os.remove(self._p(path))
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        new = self._p(newpath)
        if os.path.lexists(new):  # SFTP v3 rename must not overwrite
            return SFTP_FAILURE
        try:
            os.rename(self._p(oldpath), new)
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        try:
            os.rename(self._p(oldpath), self._p(newpath))
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def mkdir(self, path: str, attr: SFTPAttributes) -> int:
        p = self._p(path)
        try:
            os.mkdir(p)
            if attr is not None:
                _apply_attrs(p, attr)
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def rmdir(self, path: str) -> int:
        try:
            os.rmdir(self._p(path))
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def chattr(self, path: str, attr: SFTPAttributes) -> int:
        try:
            _apply_attrs(self._p(path), attr)
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def symlink(self, target_path: str, path: str) -> int:
        # target kept verbatim (relative targets stay relative, like OpenSSH's sftp-server)
        try:
            os.symlink(target_path, self._p(path))
        except OSError as e:
            return self._err(e)
        return SFTP_OK

    def readlink(self, path: str) -> str | int:
        try:
            return os.readlink(self._p(path))
        except OSError as e:
            return self._err(e)


# --- the OpenSSH node ----------------------------------------------------------------------

SSHD = "/usr/sbin/sshd"
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                          "/usr/libexec/sftp-server", "/usr/lib/ssh/sftp-server")


def sshd_path() -> str | None:
    """The system sshd, or None (tests skip with a reason)."""
    return SSHD if os.access(SSHD, os.X_OK) else shutil.which("sshd")


class OpenSshNode(_FakeNode):
    """A fake node served by a real OpenSSH ``sshd -D`` (one per node, own config in the state
    folder beside the host key). A ForceCommand wrapper puts every session — commands, shells and
    the sftp subsystem — in the node root with HOME and the LABKIT_* markers set, so the node
    behaves like PythonSshNode. ``stop()`` freezes sshd (no new forks), kills it and all its
    descendants, then sweeps the marker for anything that escaped."""

    def __init__(self, name: str, root: Path, host: str, port: int, host_key: Path,
                 authorized_keys: Path, log: logging.Logger):
        super().__init__(name, root, host, port, host_key, authorized_keys, log)
        self.conf_dir = self.host_key_path.parent / f"{name}.sshd"
        self._proc: subprocess.Popen | None = None
        self._closed = False

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        sshd = sshd_path()
        if sshd is None:
            raise RuntimeError("OpenSshNode needs sshd (install openssh-server)")
        sftp = next((p for p in SFTP_SERVER_CANDIDATES if os.access(p, os.X_OK)), None)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        # sshd insists that the host key is private; the authorized keys are copied so that
        # their ownership/mode never trips sshd (StrictModes is off anyway).
        os.chmod(self.host_key_path, 0o600)
        wrapper = self.conf_dir / "session.sh"
        root = _sh_quote(str(self.root))
        wrapper.write_text(
            "#!/bin/sh\n"
            "# every session of this fake node starts here (sshd ForceCommand)\n"
            f"cd {root} || exit 1\n"
            f"HOME={root}; {ENV_NODE}={_sh_quote(self.name)}; {ENV_ROOT}={root}\n"
            f"export HOME {ENV_NODE} {ENV_ROOT}\n"
            'if [ -n "$SSH_ORIGINAL_COMMAND" ]; then exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"; fi\n'
            "exec /bin/sh\n")
        wrapper.chmod(0o755)
        conf = self.conf_dir / "sshd_config"
        lines = [
            f"ListenAddress {self.host}:{self.port}",
            f"HostKey {self.host_key_path}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PidFile none",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxStartups 200:30:400",
            "MaxSessions 100",
            "LogLevel ERROR",
            f"ForceCommand {wrapper}",
        ]
        if sftp:
            lines.append(f"Subsystem sftp {sftp}")
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"fake node {self.name} is closed")
            if self.up:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            ensure_host_key(self.host_key_path)
            conf = self._write_config()
            if os.geteuid() == 0:
                # privilege separation folder; a fresh container has none
                os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            log_path = self.conf_dir / "sshd.log"
            # sshd runs under a small shell watchdog: if the lab process dies without calling
            # stop() (SIGKILL, crash), the node powers off by itself within a second instead of
            # leaving an orphan sshd and its sessions behind.
            sshd = " ".join(_sh_quote(a) for a in (
                sshd_path() or SSHD, "-D", "-e", "-f", str(conf), "-p", str(self.port)))
            marker = _sh_quote(self.marker.decode())
            watchdog = (
                f"{sshd} & s=$!; "
                f"while kill -0 {os.getpid()} 2>/dev/null && kill -0 $s 2>/dev/null; "
                "do sleep 1; done; kill -KILL $s 2>/dev/null; "
                f"for p in $(grep -lzx {marker} /proc/[0-9]*/environ 2>/dev/null "
                "| cut -d/ -f3); do kill -KILL $p 2>/dev/null; done")
            with open(log_path, "ab") as logf:
                self._proc = subprocess.Popen(
                    ["/bin/sh", "-c", watchdog], stdin=subprocess.DEVNULL, stdout=logf,
                    stderr=logf, start_new_session=True, close_fds=True)
            # ready when the port answers (sshd binds quickly, but not instantly)
            end = time.monotonic() + 10
            while True:
                if self._proc.poll() is not None:
                    self._proc = None
                    tail = log_path.read_text(errors="replace")[-500:]
                    raise RuntimeError(f"sshd for fake node {self.name} exited: {tail.strip()}")
                try:
                    socket.create_connection((self.host, self.port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > end:
                        self.stop()
                        raise RuntimeError(
                            f"sshd for fake node {self.name} did not listen on port {self.port}"
                        ) from None
                    time.sleep(0.02)
            self.log.info("node %s: sshd (watchdog pid %d) listening on %s:%d", self.name,
                          self._proc.pid, self.host, self.port)

    def stop(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        extra: list[int] = []
        if proc is not None:
            try:
                os.kill(proc.pid, signal.SIGSTOP)  # no new connections forked while we sweep
            except ProcessLookupError:
                pass
            extra = descendants(proc.pid)
            for pid in extra:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            extra = [*descendants(proc.pid), proc.pid]
            for pid in extra:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        n = kill_marked(self.marker)
        if proc is not None:
            self.log.info("node %s: sshd stopped, %d process(es) killed", self.name,
                          len(extra) + n)

    def close(self) -> None:
        self.stop()
        self._closed = True


def _sh_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


__all__ = ["PythonSshNode", "OpenSshNode", "SshNodeSet", "ensure_host_key", "sshd_path",
           "free_port"]


# --- a bare SSH lab for tests (no BMCs) ----------------------------------------------------

class SshNodeSet:
    """N fake nodes with SSH only, plus an inventory listing them, in one folder: what tests of
    the SSH layer need before (or without) a full fake lab with BMC power. Laid out like the
    lab's state folder (id_ed25519, known_hosts, nodes/NAME/, nodes/NAME.host_key).

        with SshNodeSet(tmp_path, ["node1", "node2"]) as lab:
            subprocess.run(["labkit", "-i", lab.inventory_path, "run", "--", "uptime"])
    """

    def __init__(self, folder: Path, names: list[str], *, kind: str = "python",
                 known: bool = True, start: bool = True, log: logging.Logger | None = None):
        self.folder = Path(folder)
        self.state_dir = self.folder / ".lab"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.key = self.state_dir / "id_ed25519"
        if not self.key.exists():
            ensure_host_key(self.key)  # same format as a client key: an ed25519 OpenSSH key
        self.authorized_keys = self.state_dir / "authorized_keys"
        self.authorized_keys.write_text(self.key.with_name("id_ed25519.pub").read_text())
        self.known_hosts = self.state_dir / "known_hosts"
        cls = {"python": PythonSshNode, "openssh": OpenSshNode}[kind]
        self.log = log or logging.getLogger("labkit.fake.node")
        self.nodes: dict[str, PythonSshNode | OpenSshNode] = {}
        for name in names:
            port = free_port()
            self.nodes[name] = cls(name, self.state_dir / "nodes" / name, "127.0.0.1", port,
                                   self.state_dir / "nodes" / f"{name}.host_key",
                                   self.authorized_keys, self.log)
        lines = []
        for n in self.nodes.values():
            key = ensure_host_key(n.host_key_path)
            if known:
                lines.append(f"[127.0.0.1]:{n.port} {key.get_name()} {key.get_base64()}\n")
        self.known_hosts.write_text("".join(lines))
        self.inventory_path = self.folder / "inventory.yaml"
        self.inventory_path.write_text(self.inventory_text())
        if start:
            self.start()

    def inventory_text(self, **ssh_extra: Any) -> str:
        out = ["nodes:\n"]
        for name, n in self.nodes.items():
            out.append(f"  {name}:\n    ssh:\n      host: 127.0.0.1\n      port: {n.port}\n"
                       f"      key_file: {self.key}\n      known_hosts: {self.known_hosts}\n")
            for k, v in ssh_extra.items():
                out.append(f"      {k}: {v}\n")
        return "".join(out)

    def start(self) -> None:
        for n in self.nodes.values():
            n.start()

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()

    def close(self) -> None:
        for n in self.nodes.values():
            n.close()

    def __enter__(self) -> SshNodeSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
