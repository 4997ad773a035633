"""The fake lab's control socket (``STATE_DIR/control.sock``): one JSON object per line in, one
reply line out. ``LabControl`` is the client used by ``lab.status``/``lab.fault`` and by tests;
``ControlServer`` runs inside the lab process on its event loop.

Ops: ping, status, fault, user (another BMC account, with the lab's BMC password and a
privilege limit), cold_reset, power (set power through the BMC's own state machine,
optionally landing now), console (tail of a node's console log), shutdown.

Why a side channel at all: faults and "what does the fake think the power is" must be
observable and switchable without going through the very IPMI path under test."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labkit.errors import LabkitError, UserError

SOCKET_NAME = "control.sock"
MAX_LINE = 1 << 20


def _connect_path(path: Path) -> tuple[str, int | None]:
    """AF_UNIX paths are limited to ~107 bytes and pytest tmp dirs are long: go through
    /proc/self/fd/N/control.sock of an O_PATH handle on the folder when needed."""
    text = str(path)
    if len(text.encode()) < 100:
        return text, None
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


class LabControl:
    """Client for a running lab's control socket."""

    def __init__(self, state_dir: str | os.PathLike, timeout: float = 10.0):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / SOCKET_NAME
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request; raise LabkitError when the lab is not there or answers ok=false
        (UserError for a bad request such as an unknown node)."""
        request = {"op": op, **args}
        addr, fd = _connect_path(self.path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(addr)
                s.sendall(json.dumps(request).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except FileNotFoundError:
            raise LabkitError(f"fake lab not running ({self.path} missing)") from None
        except (TimeoutError, ConnectionRefusedError, OSError) as e:
            raise LabkitError(f"fake lab control socket {self.path}: {e}") from None
        finally:
            if fd is not None:
                os.close(fd)
        if not buf:
            raise LabkitError("fake lab closed the control connection without answering")
        reply = json.loads(buf)
        if not reply.get("ok"):
            cls = UserError if reply.get("user_error") else LabkitError
            raise cls(f"fake lab: {reply.get('error', 'request failed')}")
        return reply

    # convenience wrappers --------------------------------------------------------------
    def ping(self) -> bool:
        try:
            self.call("ping")
            return True
        except LabkitError:
            return False

    def status(self) -> dict[str, dict[str, Any]]:
        return self.call("status")["nodes"]

    def fault(self, node: str = "*", **faults: Any) -> dict[str, Any]:
        return self.call("fault", node=node, **faults)

    def clear(self, node: str = "*") -> dict[str, Any]:
        return self.call("fault", node=node, clear=True)

    def user(self, node: str, name: str, privilege: str) -> dict[str, Any]:
        """Add BMC account ``name`` (the lab's BMC password) limited to ``privilege``:
        callback | user | operator | admin."""
        return self.call("user", node=node, name=name, privilege=privilege)

    def cold_reset(self, node: str) -> dict[str, Any]:
        return self.call("cold_reset", node=node)

    def power(self, node: str, action: str, now: bool = False) -> dict[str, Any]:
        return self.call("power", node=node, action=action, now=now)

    def console(self, node: str, tail: int = 65536) -> str:
        return self.call("console", node=node, tail=tail)["text"]

    def shutdown(self) -> None:
        self.call("shutdown")

    def wait(self, node: str, timeout: float = 30.0, interval: float = 0.05,
             **want: Any) -> dict[str, Any]:
        """Poll status until every ``key=value`` in want holds for node, e.g.
        ``wait("node1", power="on", ssh=True)``; returns that node's status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()[node]
            if all(st.get(k) == v for k, v in want.items()):
                return st
            if time.monotonic() > deadline:
                raise LabkitError(f"{node}: waited {timeout}s for {want}, last status {st}")
            time.sleep(interval)


class ControlServer:
    """Line-oriented JSON server on the lab's loop (non-blocking, many clients)."""

    def __init__(self, loop: Any, path: Path, handle: Callable[[dict], dict]):
        self.loop = loop
        self.path = Path(path)
        self.handle = handle
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        addr, fd = _connect_path(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(addr)
        finally:
            if fd is not None:
                os.close(fd)
        os.chmod(self.path, 0o600)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.clients: dict[socket.socket, bytearray] = {}
        loop.add_reader(self.sock, self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self.clients[conn] = bytearray()
            self.loop.add_reader(conn, lambda c=conn: self._read(c))

    def _read(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        buf = self.clients[conn]
        buf += chunk
        if len(buf) > MAX_LINE:
            self._drop(conn)
            return
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            reply = self._dispatch(line)
            try:
                conn.setblocking(True)
                conn.settimeout(5)
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
                conn.setblocking(False)
            except OSError:
                self._drop(conn)
                return

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            return self.handle(request)
        except UserError as e:
            return {"ok": False, "error": str(e), "user_error": True}
        except (ValueError, TypeError, KeyError) as e:
            return {"ok": False, "error": f"bad request: {e}", "user_error": True}
        except Exception as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def _drop(self, conn: socket.socket) -> None:
        self.loop.remove_reader(conn)
        self.clients.pop(conn, None)
        conn.close()

    def close(self) -> None:
        for conn in list(self.clients):
            self._drop(conn)
        self.loop.remove_reader(self.sock)
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
