"""``sync`` stopped between stash and re-apply: SIGTERM puts the changes back, SIGKILL is caught
by the next run, and no backup of a stash still listed is ever pruned.

A git hook holds the sync at a known step: it records its parent (git) and then blocks on a
FIFO, so the test waits on state — the hook's pid file — never on a fixed sleep. The repository
helpers and the diff-level ``local_state`` come from test_sync."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import test_sync
from test_sync import BIN, git, local_state, make_local_changes, sh, stashes, upstream

from labkit.sync import BACKUP_PREFIX, KEEP_BACKUPS, git_error_line, sync_repo

git_env = test_sync.git_env   # autouse: an isolated git identity and config
repos = test_sync.repos


def wait_for(cond, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def hold_in_hook(work: Path, hook: str, tmp: Path) -> tuple[Path, Path]:
    """Install ``hook``: it writes git's pid, then blocks until the FIFO is opened."""
    fifo, pidfile = tmp / "release", tmp / "git.pid"
    os.mkfifo(fifo)
    path = work / ".git" / "hooks" / hook
    path.write_text(f"#!/bin/sh\necho $PPID > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}\n"
                    f"read x < {fifo}\nexit 0\n")
    path.chmod(0o755)
    return fifo, pidfile


def release(fifo: Path) -> None:
    """Unblock the hook if it still waits (a no-op once it is gone)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader any more
        return
    os.write(fd, b"go\n")
    os.close(fd)


def start_sync(work: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "labkit"), "sync", "--repo", str(work), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def labkit_sync(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "labkit"), "sync", "--repo", str(work)],
                          capture_output=True, text=True, timeout=60)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie of an exited git is gone for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.mark.parametrize("mode,hook", [("ff-only", "post-merge"), ("rebase", "pre-rebase")])
def test_sigterm_between_stash_and_reapply_restores_everything(repos, tmp_path: Path,
                                                               mode: str, hook: str) -> None:
    """post-merge: the pull is done, the changes only in the stash; pre-rebase: stashed, the
    rebase not begun. SIGTERM -> the changes are back, nothing pending, exit 143."""
    _, work, other = repos
    make_local_changes(work)
    before, head = local_state(work), git(work, "rev-parse", "HEAD").strip()
    new = upstream(other, {"a.txt": "a1\nA2\na3\n", "new.txt": "n\n"})
    fifo, pidfile = hold_in_hook(work, hook, tmp_path)
    proc = start_sync(work, *(["--rebase"] if mode == "rebase" else []))
    try:
        wait_for(pidfile.exists, "the hook")
        assert len(stashes(work)) == 1 and git(work, "status", "--porcelain") == ""
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        release(fifo)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out + err
    assert "interrupted (SIGTERM)" in err and "local changes restored" in out, out + err
    assert local_state(work) == before and stashes(work) == []
    assert git(work, "rev-parse", "HEAD").strip() == (new if hook == "post-merge" else head)
    assert gone(int(pidfile.read_text()))      # git and its hook were ended, not left behind
    # nothing is left pending: the next sync goes on as usual
    (work / ".git" / "hooks" / hook).unlink()
    r = labkit_sync(work)
    assert r.returncode == 0, r.stdout + r.stderr
    assert git(work, "rev-parse", "HEAD").strip() == new and local_state(work) == before


def test_sigkill_between_stash_and_reapply_is_refused_by_the_next_sync(repos,
                                                                       tmp_path: Path) -> None:
    """Killed outright after the pull, before the re-apply: the next sync refuses (exit 2) with
    the one command that restores the changes, and that command does."""
    _, work, other = repos
    make_local_changes(work)
    before = local_state(work)
    new = upstream(other, {"a.txt": "a1\nA2\na3\n"})
    fifo, pidfile = hold_in_hook(work, "post-merge", tmp_path)
    proc = start_sync(work)
    try:
        wait_for(pidfile.exists, "the hook")
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        release(fifo)
    wait_for(lambda: gone(int(pidfile.read_text())), "git to end")  # it runs on, on its own
    assert git(work, "rev-parse", "HEAD").strip() == new and len(stashes(work)) == 1
    (work / ".git" / "hooks" / "post-merge").unlink()

    refs_before = git(work, "show-ref")
    r = labkit_sync(work)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "stopped before it put your local changes back" in lines[0]
    assert "stash@{0}" in lines[0] and BACKUP_PREFIX in lines[0]
    assert git(work, "show-ref") == refs_before and len(stashes(work)) == 1  # nothing touched
    commands = re.findall(r"`([^`]+)`", lines[0])
    assert commands == ["git stash pop --index stash@{0}"]
    sh(work, commands[0])
    assert local_state(work) == before and stashes(work) == []
    r = labkit_sync(work)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr


def test_sigkill_mid_rebase_names_the_abort_too(repos, tmp_path: Path) -> None:
    """Killed while a --rebase stopped on a conflict: the refusal comes before the "middle of
    a rebase" one, and its command aborts the rebase and restores the changes."""
    _, work, other = repos
    (work / "a.txt").write_text("a1\nLOCAL\na3\n")
    git(work, "commit", "-qam", "local commit")
    make_local_changes(work)
    before, head = local_state(work), git(work, "rev-parse", "HEAD").strip()
    upstream(other, {"a.txt": "a1\nREMOTE\na3\n"})
    # the sync is killed as the rebase stops; stand in for it: stash as it does, then rebase
    msg = "labkit sync 20200101T000000-1: local changes before pulling origin/main"
    git(work, "stash", "push", "--include-untracked", "-m", msg)
    git(work, "fetch", "-q")
    git(work, "rebase", "origin/main", check=False)
    rep = sync_repo(work)
    assert (rep.status, rep.exit_code) == ("refused", 2)
    assert "stopped before" in rep.message and "middle of" not in rep.message
    (cmd,) = [c for c in re.findall(r"`([^`]+)`", rep.message) if "pop" in c]
    assert cmd == "git rebase --abort && git stash pop --index stash@{0}"
    sh(work, cmd)
    assert git(work, "rev-parse", "HEAD").strip() == head and local_state(work) == before


def test_apply_conflict_stash_is_not_pending_and_its_backup_is_never_pruned(repos) -> None:
    """A stash kept after an apply conflict was reported at the time: later syncs go on. Its
    backup ref survives any number of newer backups while the stash is still listed."""
    _, work, other = repos
    (work / "a.txt").write_text("a1\nMINE\na3\n")
    upstream(other, {"a.txt": "a1\nTHEIRS\na3\n"})
    rep = sync_repo(work)
    assert rep.status == "apply-conflict" and stashes(work) == [rep.stash]
    (work / "a.txt").write_text("a1\nRESOLVED\na3\n")
    git(work, "add", "a.txt")
    head = git(work, "rev-parse", "HEAD").strip()
    for i in range(KEEP_BACKUPS + 5):                  # newer backups, sorting after it
        git(work, "update-ref", f"{BACKUP_PREFIX}99990101T0000{i:02d}-1", head)
    upstream(other, {"b.txt": "b1\nupstream\n"})
    again = sync_repo(work)
    assert (again.status, again.exit_code) == ("synced", 0), again.message
    assert git(work, "rev-parse", rep.backup_ref).strip() == rep.stash   # not pruned
    assert stashes(work) == [rep.stash]
    left = git(work, "for-each-ref", "--format=%(refname)", BACKUP_PREFIX).split()
    assert len(left) == KEEP_BACKUPS + 1 and rep.backup_ref in left


def test_git_failures_read_like_every_other_failed_command(repos, tmp_path: Path) -> None:
    from labkit.ssh.errors import last_error_line

    _, work, other = repos
    upstream(other, {"a.txt": "x\n"})
    git(work, "remote", "set-url", "origin", str(tmp_path / "gone.git"))
    rep = sync_repo(work, timeout=30)
    assert re.search(r"nothing was changed: exit code 128: fatal: ", rep.message), \
        rep.message
    # git's own line wins over the hints printed after it; otherwise the generic rule
    assert git_error_line("error: Your local changes would be overwritten\n\tb.txt\n"
                          "Aborting\n") == "error: Your local changes would be overwritten"
    for text in ("one\ntwo \x1b[1m\n\n", "x" * 400, ""):
        assert git_error_line(text) == last_error_line(text.encode())


def test_the_node_side_copy_of_plural_matches_labkit_text() -> None:
    from labkit import sync, text

    for n in (0, 1, 2):
        for args in (("commit",), ("nested repository", "nested repositories")):
            assert sync.plural(n, *args) == text.plural(n, *args)
