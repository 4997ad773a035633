"""Payload bundles on nodes: delta upload into a new release, build, atomic switch, manifest,
drift check, rollback.

    bundle.py    what one deploy ships: files, modes, hashes (cached), git revision, digest
    plan.py      what a node has (its probe) against the bundle: send, keep, in sync, drift
    deployer.py  the Deployer: per node one probe and, if anything changed, one stage command,
                 over THE fan-out
    labkit/nodeside/probe.sh, stage.py   the node's side; labkit/ssh/stream.py the transport

On each node, under the workdir (``node.ssh.workdir``, default ``labkit`` in the home folder)::

    payloads/releases/<id>/          one folder per release: the files, MANIFEST, .labkit-stat
    payloads/releases/.incoming-<id> a release being assembled (never pointed at)
    payloads/current  -> releases/<id>   what runs; replaced with rename(2), never edited
    payloads/previous -> releases/<id>   the release before, for ``deploy --rollback``
    payloads/.lock                   flock: one deploy/rollback per node at a time

Why it is shaped like this:

* A node never runs a half-uploaded payload: files land in ``.incoming-<id>``, the build runs
  there, and only a complete, built folder is renamed to its final name and then pointed at by a
  new ``current`` symlink swapped in with rename(2). If the controller is SIGKILLed, the session
  dies, the node kills the agent, and the leftover ``.incoming-*`` is removed (and reported) by
  the next deploy.
* Few round trips: each node costs one read-only ``sh`` probe (``probe.sh``: symlinks, the
  current/previous MANIFESTs, leftovers, files touched since the release was built) and, if
  anything changed, one ``stage`` command that receives the changed files as one stream on its
  stdin, copies the unchanged ones from the current/previous release, builds, renames,
  switches and prunes. An unchanged redeploy is one connection and one shell per node.
* The stage side is a small stdlib-only Python program (``stage.py``) passed inside the exec
  request with ``python3 -I -S -c``: the nodes need python3 anyway (labkit's payloads are
  Python), and it gives exact JSON answers, flock and rename semantics that a portable ``sh``
  script cannot. Nothing is uploaded first, so there is no version skew to manage.
* One stream over an exec channel rather than SFTP or ``tar``: no per-file request/response,
  and with our own small in-flight limit (``labkit.ssh.stream``) the node side spends less
  CPU per byte than an SFTP server does for ``scp`` (bench/deploy.py measures both).
* Releases share no inode: unchanged files are copied on the node, never hard-linked, so an
  in-place edit in one release (root ignores modes, so read-only files would not stop it)
  cannot reach another. The copy runs in the kernel (FICLONE reflink, else copy_file_range,
  else read/write). A kept file is trusted by the stat of the open source against its
  release's seal, the ``.labkit-stat`` index (size, mtime_ns) and that marker's mtime (ctime
  not after it: an edit can put size and mtime back, never ctime); only a file the stat does
  not vouch for is hashed, and one that no longer holds what the new MANIFEST promises is
  refused by the node and sent instead, once (a second mismatch is an error). A release is
  switched to only once the file clock has passed its marker, so the strict ``-cnewer`` of
  the probe and the seal see an edit made in the marker's own tick. ``--rollback`` checks
  ``previous`` the same way and refuses a modified one, naming the files; ``--check`` hashes
  every file. The cost: a redeploy with one of 64 MiB changed copies 63 MiB per node
  (bench/deploy.py, 8 nodes: 0.54 s with hard links, 2.09 s when every kept file was hashed;
  on a busier machine 2.2-2.6 s hashed against 1.4-1.7 s with kernel copies and stat seals).
"""

from labkit.deploy.bundle import (
    DEFAULT_BUNDLE,
    HASHES,
    IGNORED_DIRS,
    IGNORED_SUFFIXES,
    RESERVED,
    Bundle,
    BundleFile,
    HashCache,
    bundle_paths,
    collect_bundle,
    describe_bundle,
    files_digest,
    git_state,
    human_bytes,
    new_release_id,
    who,
)
from labkit.deploy.deployer import (
    CHECK_COLUMNS,
    COLUMNS,
    DEFAULT_WORKDIR,
    Connect,
    Deployer,
    Transfer,
    agent_command,
    build_setting,
    columns_for,
    deployer_for,
    remote_workdir,
)
from labkit.deploy.plan import (
    Plan,
    check_state,
    in_sync,
    parse_sh_probe,
    plan_upload,
    sh_probe_command,
)
from labkit.nodeside.stage import MANIFEST, PYTHON_CHECK, STAT_INDEX

__all__ = [
    "CHECK_COLUMNS", "COLUMNS", "DEFAULT_BUNDLE", "DEFAULT_WORKDIR", "HASHES",
    "IGNORED_DIRS", "IGNORED_SUFFIXES", "MANIFEST", "PYTHON_CHECK", "RESERVED", "STAT_INDEX",
    "Bundle", "BundleFile", "Connect", "Deployer", "HashCache", "Plan", "Transfer",
    "agent_command", "build_setting", "bundle_paths", "check_state", "collect_bundle",
    "columns_for", "deployer_for", "describe_bundle", "files_digest", "git_state",
    "human_bytes", "in_sync", "new_release_id", "parse_sh_probe", "plan_upload",
    "remote_workdir", "sh_probe_command", "who",
]
