"""Fake lab nodes, by their old address: the names importers used before the split.

Where each part lives now:

* ``fake/base.py``          the FakeNode base, host keys, the environment sessions get
* ``fake/sshd.py``          ``PythonSshNode``: paramiko's SSH server in the lab process
* ``fake/sftp.py``          its SFTP server, rooted at the node's folder
* ``fake/openssh.py``       ``OpenSshNode``: a real ``sshd -D`` per node
* ``fake/sshd_watchdog.py`` the program that runs that sshd and powers the node off
* ``fake/harness.py``       ``SshNodeSet`` and the whole-lab starter, for tests and benches
* ``fake/ports.py``         ``free_port``
* ``labkit/nodeside/killmarked.py``  kill-by-marker, on nodes and here alike"""

from __future__ import annotations

from labkit.fake.base import ENV_NODE, ENV_ROOT, FakeNode, ensure_host_key, node_env
from labkit.fake.harness import SshNodeSet
from labkit.fake.openssh import OpenSshNode, sshd_path
from labkit.fake.ports import free_port
from labkit.fake.sshd import PythonSshNode, authorized
from labkit.fake.sshd_watchdog import descendants
from labkit.nodeside import killmarked

__all__ = ["ENV_NODE", "ENV_ROOT", "FakeNode", "OpenSshNode", "PythonSshNode", "SshNodeSet",
           "authorized", "descendants", "ensure_host_key", "free_port", "marked_pids",
           "node_env", "sshd_path"]


def marked_pids(marker: bytes) -> list[int]:
    """Live processes whose environment carries ``marker`` (e.g. b"LABKIT_NODE_ROOT=/x")."""
    return killmarked.marked([marker])
