"""The pure-Python fake node: an SSH server (paramiko) inside the lab process, so a fake lab
needs no system sshd (``make demo`` on a laptop).

Every exec/shell request becomes a real ``/bin/sh`` process in its own session, with the node
root as cwd and HOME and the node markers in its environment (``fake/base.py``); its stdio is
pumped over the channel, and a channel or connection that goes away kills its process group,
as a dropped controller connection must. ``direct-tcpip`` channels are forwarded, so a fake
node can be a ProxyJump host. ``stop()`` is a power-off: the port refuses connections and
every process started through the node dies — the tracked sessions' groups and anything else
carrying the node's marker (``setsid``/double-forked children included)."""

from __future__ import annotations

import base64
import errno
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paramiko

from labkit.fake.base import SWEEP_INTERVAL, FakeNode, ensure_host_key, node_env
from labkit.fake.sftp import RootedSftp, SftpSubsystem
from labkit.nodeside import killmarked
from labkit.ssh.shell import READ_SIZE

# Big windows and packets: paramiko's defaults (2 MiB / 32 KiB) cap a single stream at a few
# tens of MiB/s because of per-packet Python overhead and window-adjust round trips.
WINDOW = 64 * 1024 * 1024
MAX_PACKET = 256 * 1024
READ_CHUNK = 256 * 1024
# Prefer AEAD ciphers: one pass through the cipher instead of cipher + HMAC per packet.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def authorized(authorized_keys: Path, key: paramiko.PKey) -> bool:
    """Is ``key`` listed in the authorized_keys file? Re-read on every attempt so a key added
    while the node runs works at once, as with sshd."""
    try:
        lines = Path(authorized_keys).read_text().splitlines()
    except OSError:
        return False
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


class PythonSshNode(FakeNode):
    """A fake node served by paramiko in the lab process. Thread-safe; start/stop idempotent."""

    def __init__(self, name: str, root: Path, host: str, port: int, host_key: Path,
                 authorized_keys: Path, log: logging.Logger):
        super().__init__(name, root, host, port, host_key, authorized_keys, log)
        self._listener: socket.socket | None = None
        self._transports: set[paramiko.Transport] = set()
        self._procs: set[_Proc] = set()
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
        # Each session's group, through its _Proc (signalled only while unreaped: a pid taken
        # from the snapshot may have been reaped by its session since, and reused); then
        # everything carrying the marker, wherever it went.
        for p in procs:
            p.kill_group()
        killed, survivors = killmarked.kill([self.marker], interval=SWEEP_INTERVAL)
        self._stopped("ssh", killed, survivors, say=sock is not None or bool(killed))

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
        t.set_subsystem_handler("sftp", SftpSubsystem, RootedSftp, root=self.root)
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

    def _spawn(self, argv: list[str], env: dict[str, str]) -> _Proc:
        with self._lock:
            if self._listener is None:
                raise OSError(errno.ECONNABORTED, "node is powering off")
            p = _Proc(argv, cwd=self.root, env=env, stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                      start_new_session=True, close_fds=True)
            self._procs.add(p)
        return p

    def _forget(self, p: _Proc) -> None:
        with self._lock:
            self._procs.discard(p)


class _Proc(subprocess.Popen):
    """A session's process, leader of its own session and process group, that is signalled
    only while it is not yet reaped: until then its pid, and the group id it shares, cannot
    name anyone else. Reaping and signalling take one lock, so neither can slip between the
    other's check and act. (Popen's own lock is held through a blocking wait(), so a kill that
    took it would wait for the very exit it is meant to cause.)"""

    def __init__(self, *args: Any, **kwargs: Any):
        self._reap_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def kill_group(self) -> None:
        """SIGKILL the process's group, unless it has been reaped."""
        with self._reap_lock:
            if self.returncode is None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def running(self) -> bool:
        with self._reap_lock:
            return self.poll() is None

    def reap(self) -> int:
        """Wait for the exit without reaping (a zombie still owns its pid, so ``kill_group``
        stays safe meanwhile), then reap under the lock; the exit code."""
        try:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # already reaped
            pass
        with self._reap_lock:
            return self.wait()


def _forward(ch: paramiko.Channel, dest: tuple[str, int]) -> None:
    try:
        s = socket.create_connection(dest, timeout=10)
    except OSError:
        _close_channel(ch)
        return
    s.settimeout(None)

    def up() -> None:
        try:
            while data := ch.recv(READ_SIZE):
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
    except (OSError, EOFError):
        pass
    finally:
        s.close()
        _close_channel(ch)


def _close_channel(ch: paramiko.Channel) -> None:
    """Close a forwarded channel whose client may already be gone: paramiko raises EOFError
    from close() when the transport's socket is closed, and a thread must not die of that."""
    try:
        ch.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass


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

    def __init__(self, node: PythonSshNode, channel: paramiko.Channel, proc: _Proc):
        self.node = node
        self.ch = channel
        self.p = proc

    def start(self) -> None:
        threading.Thread(target=self._stdin, daemon=True).start()
        self._err = threading.Thread(target=self._pump, args=(self.p.stderr, True), daemon=True)
        self._err.start()
        threading.Thread(target=self._main, daemon=True).start()

    def _kill(self) -> None:
        self.p.kill_group()

    def _stdin(self) -> None:
        stdin = self.p.stdin
        try:
            while True:
                data = self.ch.recv(READ_SIZE)
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
        while self.p.running():
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
        rc = self.p.reap()
        self.node._forget(self.p)
        if rc < 0:
            rc = 128 - rc  # killed by a signal: shell convention
        try:
            self.ch.send_exit_status(rc)
            self.ch.shutdown_write()
            self.ch.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass
