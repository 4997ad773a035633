"""``sync``: bring a research checkout up to date with its upstream without ever losing local work.

The seed's recipe was ``git stash; git pull; git stash apply``. Each step can go wrong in a way
that loses or buries work (a pull that conflicts half-way, a stash that no longer applies and
gets dropped anyway, a mid-rebase tree stashed on top of). This module runs the same recipe with
every failure handled:

1. Refuse before touching anything when the repository is in a state a stash would make worse:
   mid-merge / rebase / cherry-pick / revert / bisect, unmerged index entries, detached HEAD,
   no commits yet, no upstream configured. (exit 2)
2. ``git fetch`` the upstream's remote first, on its own. A network failure therefore happens
   before the working tree is touched, and we know the incoming commits (and, for the default
   fast-forward-only mode, whether a fast-forward is possible) before stashing anything.
3. Nothing incoming -> done, nothing stashed.
4. ``git stash push --include-untracked`` (only when there is something to stash), then at once
   ``git update-ref refs/labkit/sync-backup/<time> <stash>``: even if this process is killed
   from here on, the stash commit is reachable from a ref that no ``git stash drop`` removes.
5. Integrate: ``git merge --ff-only @{u}`` (default), ``git rebase @{u}`` (``--rebase``) or
   ``git merge --no-edit @{u}`` (``--merge``). This is exactly what ``git pull`` does after its
   fetch; we do not honour ``pull.rebase`` / ``pull.ff`` from the user's config — a sync that
   silently creates a merge commit is a surprise, so the default is fast-forward only and
   anything else is asked for by name. If it fails, it is aborted, HEAD is put back, the stash
   is re-applied and dropped: the tree is exactly as before. (exit 1)
6. ``git stash apply --index <stash>`` (retry without ``--index`` when only the staged/unstaged
   split cannot be rebuilt; said in the report). Clean -> drop the stash. Conflict -> the stash
   is KEPT, the conflicted files are listed with the commands to finish or to go back. (exit 1)

Interrupted (Ctrl-C, SIGTERM, SIGHUP) anywhere in 4-6: the running git command is ended first
(stash commands finish, merge/rebase get SIGTERM), then the same clean-up as a failure — a
half-done pull undone, the stash re-applied and dropped, or kept with the commands — and the
task exits 128 + the signal with that report (``SyncInterrupted``). Killed outright
(SIGKILL): the next sync finds the labkit stash no report handed over and refuses (exit 2, as
any state a sync would make worse) with the one command that restores it. Backup refs of a
stash still in the stash list are never pruned.

Dry run (``dry_run=True``): steps 1-2 only (the fetch updates remote-tracking refs, nothing
else — that is how it knows how far behind the branch is; ``fetch=False`` skips even that), then
it says what it would stash, which commits it would bring in, and which locally changed files the
incoming commits also touch (where the re-apply could conflict).

ONE implementation for the controller and the nodes: this module imports only the standard
library at module level, so ``sync --nodes`` ships this very file to each node and runs it as
``python3 - ARGS`` (script on stdin), which prints the report as JSON. The controller-side
fan-out (``sync_nodes``) imports labkit lazily, inside the function, for the same reason.

Exit codes: 0 up to date / synced / dry run that would succeed; 1 an operation failed (network,
pull conflict, apply conflict — nothing lost, the report says where everything is); 2 refused
before touching anything (not a repository, mid-merge, detached HEAD, no upstream, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # controller-side types only: on a node this module runs on the stdlib alone
    from collections.abc import Sequence

    from labkit.config import Settings
    from labkit.fanout import Outcome
    from labkit.inventory import Node
    from labkit.ssh import ShellPool

MODES = ("ff-only", "rebase", "merge")
BACKUP_PREFIX = "refs/labkit/sync-backup/"
# A kept stash the report already handed to the user (apply conflict): same stamp as its
# backup ref. A labkit stash in the stash list WITHOUT one was never applied nor reported —
# the sync was killed — and the next sync refuses until it is restored (``_check_pending``).
KEPT_PREFIX = "refs/labkit/sync-kept/"
STASH_RE = re.compile(r"labkit sync (\d{8}T\d{6}(?:\.\d{6})?-\d+): local changes before pulling ")
INTERRUPT_GRACE = 10.0   # seconds a git command has to end after SIGTERM, then SIGKILL
ERROR_LINE_MAX = 300     # as labkit.ssh.errors.ERROR_LINE_MAX (this file cannot import it)
KEEP_BACKUPS = 20        # older backup refs are pruned after a sync that needed none of them
MAX_COMMITS_LISTED = 20  # the report's oneline list is truncated beyond this

OK, FAILED, REFUSED = 0, 1, 2


@dataclass
class SyncReport:
    """What happened (or would happen), for a person (``format_report``) and for ``--json``."""

    repo: str
    status: str = "error"   # up-to-date | synced | would-sync | refused | pull-failed |
    #                         apply-conflict | interrupted | error
    exit_code: int = FAILED
    message: str = ""
    dry_run: bool = False
    mode: str = "ff-only"
    branch: str | None = None
    upstream: str | None = None
    before: str | None = None          # full sha of HEAD before
    after: str | None = None           # full sha of HEAD after (== before when nothing changed)
    ahead: int = 0                     # local commits not upstream
    behind: int = 0                    # upstream commits not local
    commits: list[str] = field(default_factory=list)   # oneline, newest first, truncated
    commits_total: int = 0
    stashed: list[str] = field(default_factory=list)   # porcelain "XY path" lines
    stash: str | None = None           # sha of the stash commit, when one was made
    stash_kept: str | None = None      # "stash@{N}" when the stash is still there (conflict)
    backup_ref: str | None = None
    restored: bool = False             # local changes are back in the working tree
    index_restored: bool = True        # staged changes are staged again
    conflicts: list[str] = field(default_factory=list)
    overlap: list[str] = field(default_factory=list)   # dry run: changed here and upstream
    recovery: list[str] = field(default_factory=list)  # commands, when something is left to do
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    """Ends the run with the report's status set; carries nothing (the report does)."""


class SyncInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM / SIGHUP during a sync, raised after the clean-up ran: ``report`` says
    where the local changes are (restored, or which stash and the command that restores it).
    A KeyboardInterrupt, so the task still ends as interrupted (exit 128 + the signal)."""

    def __init__(self, report: SyncReport):
        super().__init__(report.message)
        self.report = report


@dataclass
class _Progress:
    """How far a sync got, for the clean-up after an interrupt: set BEFORE each step starts,
    so an interrupt anywhere in a step finds that step named here."""

    git: Git | None = None
    phase: str = "check"      # check (incl. fetch, dry run) | stash | integrate | apply | done
    stamp: str = ""           # of this sync's stash message and backup ref


class Git:
    """``git -C repo`` with a predictable environment: C locale (we parse a few messages), no
    prompts (a sync must never sit waiting for a password), no editor, stdin closed."""

    def __init__(self, repo: Path, timeout: float):
        self.repo = repo
        self.timeout = timeout
        env = dict(os.environ)
        for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
            env.pop(k, None)
        env.update(LC_ALL="C", LANGUAGE="", GIT_TERMINAL_PROMPT="0", GIT_MERGE_AUTOEDIT="no",
                   GIT_EDITOR="true", GIT_SEQUENCE_EDITOR="true")
        self.env = env
        # Paths that belong to another repository (submodules, nested checkouts): never ours
        # to stash, clean or reset; ``status_entries`` leaves them out.
        self.skip: tuple[str, ...] = ()

    def __call__(self, *args: str, check: bool = True, network: bool = False,
                 extra_env: dict[str, str] | None = None,
                 finish: bool = False) -> subprocess.CompletedProcess:
        """Run git. On Ctrl-C/SIGTERM (a KeyboardInterrupt here) the command is ended before
        the interrupt goes on, so the clean-up never races a git still writing: ``finish``
        (stash push/apply/drop, update-ref: short, local, and half-done they would leave the
        tree and the stash both holding the changes) lets it run to its end; otherwise
        (fetch, merge, rebase: may wait on the network or a hook) it gets SIGTERM — git
        removes its lock files on it — and SIGKILL after INTERRUPT_GRACE."""
        env = self.env if not extra_env else {**self.env, **extra_env}
        argv = ["git", "-C", str(self.repo), *args]
        # Network commands get the configured budget and their own process group, so a hung
        # ssh under git is killed with it; local commands are bounded generously.
        timeout = self.timeout if network else max(self.timeout, 120.0)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except KeyboardInterrupt:
            _end_child(p, finish, timeout)
            raise
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            out, err = p.communicate()
            raise GitFailed(f"git {args[0]} timed out after {timeout:.0f}s", -1, "") from None
        r = subprocess.CompletedProcess(argv, p.returncode, out.decode(errors="replace"),
                                        err.decode(errors="replace"))
        if check and r.returncode != 0:
            raise GitFailed(f"git {' '.join(args[:2])}: {exit_text(r.returncode, r.stderr)}",
                            r.returncode, r.stderr)
        return r

    def out(self, *args: str, **kw: Any) -> str:
        return self(*args, **kw).stdout.strip()

    def ok(self, *args: str) -> bool:
        return self(*args, check=False).returncode == 0


def _end_child(p: subprocess.Popen, finish: bool, timeout: float) -> None:
    """End git after an interrupt (see ``Git.__call__``); a second signal meanwhile changes
    nothing — the child is being ended already, and the clean-up must come after it."""
    if not finish:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + (timeout if finish else INTERRUPT_GRACE)
    while True:
        try:
            p.communicate(timeout=max(0.0, deadline - time.monotonic()))
            return
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            deadline = time.monotonic() + INTERRUPT_GRACE
        except KeyboardInterrupt:
            continue


class GitFailed(Exception):
    def __init__(self, message: str, code: int, stderr: str):
        super().__init__(message)
        self.code = code
        self.stderr = stderr


def git_error_line(stderr: str) -> str | None:
    """Why git failed, as one printable line: its last ``fatal:``/``error:`` line, else the
    last non-empty one (as ``labkit.ssh.errors.last_error_line``). git needs the first rule
    because it prints hints and "Aborting" AFTER the line that says why; and this file cannot
    import labkit.ssh.errors, as it runs on nodes with the stdlib alone (tests keep the two
    agreeing on text without such lines)."""
    lines = ["".join(c if c.isprintable() else " " for c in ln).strip()
             for ln in stderr[-16384:].splitlines()]
    lines = [ln for ln in lines if ln]
    said = [ln for ln in lines if ln.startswith(("fatal:", "error:"))] or lines
    if not said:
        return None
    line = said[-1]
    return line if len(line) <= ERROR_LINE_MAX else line[:ERROR_LINE_MAX] + "..."


def exit_text(code: int, stderr: str) -> str:
    """``exit code N: <why>``: a failed git command reads like every other failed command
    (``labkit.ssh.errors.exit_text``), with git's own line as the why."""
    line = git_error_line(stderr)
    return f"exit code {code}: {line}" if line else f"exit code {code}"


def status_entries(git: Git) -> list[str]:
    """Everything ``git stash -u`` would take: porcelain ``XY path`` lines (untracked included,
    ignored files excluded — stash leaves those alone, and so do we)."""
    raw = git("status", "--porcelain=v1", "-z", "--untracked-files=all").stdout
    parts = raw.split("\0")
    entries: list[str] = []
    i = 0
    while i < len(parts):
        item = parts[i]
        i += 1
        if not item:
            continue
        if item[0] in "RC":  # rename/copy: the next field is the source path
            i += 1
        if not _under(item[3:].rstrip("/"), git.skip):
            entries.append(item)
    return entries


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 commit``, ``2 commits``. A marked copy of ``labkit.text.plural``, like the node-side
    programs keep: this file runs on nodes with the stdlib only (tests keep the two equal)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def other_repos(git: Git, entries: list[str]) -> tuple[list[str], list[str]]:
    """(gitlinks, nested): paths the index records as another repository (submodules, also
    nested checkouts added with ``git add``), and untracked folders that are repositories of
    their own. ``git stash`` cannot take either (it records a gitlink, never what is inside),
    and ``git clean -fd`` leaves nested repositories alone — so sync leaves them alone too."""
    links = [ln.split("\t", 1)[1] for ln in git.out("ls-files", "-s", "-z").split("\0")
             if ln.startswith("160000 ")]
    nested = [e[3:].rstrip("/") for e in entries
              if e.startswith("?? ") and e.endswith("/")
              and os.path.lexists(os.path.join(git.repo, e[3:], ".git"))]
    return sorted(set(links)), nested


def in_progress(git_dir: Path) -> str | None:
    """The operation the repository is in the middle of, if any."""
    checks = (("MERGE_HEAD", "a merge"), ("rebase-merge", "a rebase"),
              ("rebase-apply", "a rebase or am"), ("CHERRY_PICK_HEAD", "a cherry-pick"),
              ("REVERT_HEAD", "a revert"), ("BISECT_LOG", "a bisect"))
    for name, what in checks:
        if (git_dir / name).exists():
            return what
    return None


def _committer_env(git: Git) -> dict[str, str]:
    """``git stash`` makes commits and so needs an identity; a node's checkout often has none.
    Fall back to a neutral one for the stash only (it is ours, not the user's history)."""
    if git.ok("var", "GIT_COMMITTER_IDENT") and git.ok("var", "GIT_AUTHOR_IDENT"):
        return {}
    return {"GIT_AUTHOR_NAME": "labkit sync", "GIT_AUTHOR_EMAIL": "labkit@localhost",
            "GIT_COMMITTER_NAME": "labkit sync", "GIT_COMMITTER_EMAIL": "labkit@localhost"}


def _net_env(git: Git) -> dict[str, str]:
    """Make ssh fail instead of prompting, unless the user chose their own ssh command."""
    if os.environ.get("GIT_SSH_COMMAND") or os.environ.get("GIT_SSH") or git.ok(
            "config", "core.sshCommand"):
        return {}
    return {"GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}


def _short(sha: str | None) -> str:
    return sha[:10] if sha else "-"


def sync_repo(repo: str | os.PathLike | None = None, *, mode: str = "ff-only",
              dry_run: bool = False, fetch: bool = True, timeout: float = 600.0) -> SyncReport:
    """Sync one checkout (``repo`` or the current directory's repository); never raises for a
    git-level problem — the report's ``status``/``exit_code``/``message`` say what happened.

    Ctrl-C / SIGTERM / SIGHUP (a KeyboardInterrupt): the same clean-up as a failure — a
    half-done pull is undone, the stash re-applied — then ``SyncInterrupted`` carrying the
    report (status ``interrupted``), which says where the changes are if they could not be
    put back. A sync killed outright (SIGKILL) is caught by the next one (``_check_pending``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    start = Path(repo) if repo else Path.cwd()
    rep = SyncReport(repo=str(start), mode=mode, dry_run=dry_run)
    prog = _Progress()
    try:
        _sync(rep, start, mode, dry_run, fetch, timeout, prog)
    except _Stop:
        pass
    except GitFailed as e:  # an unexpected git failure outside the handled steps
        rep.status, rep.exit_code = "error", FAILED
        rep.message = str(e) + (" — " + rep.message if rep.message else "")
    except KeyboardInterrupt as e:
        _after_interrupt(rep, prog)
        raise SyncInterrupted(rep) from e
    return rep


def _refuse(rep: SyncReport, message: str) -> None:
    rep.status, rep.exit_code, rep.message = "refused", REFUSED, message
    raise _Stop


def _sync(rep: SyncReport, start: Path, mode: str, dry_run: bool, fetch: bool,
          timeout: float, prog: _Progress) -> None:
    if not start.is_dir():
        _refuse(rep, f"{start}: no such directory")
    probe = Git(start, timeout)
    top = probe("rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0 or not top.stdout.strip():
        _refuse(rep, f"{start}: not inside a git working tree ({exit_text(top.returncode, top.stderr)})")
    repo = Path(top.stdout.strip())
    rep.repo = str(repo)
    git = Git(repo, timeout)
    git_dir = Path(git.out("rev-parse", "--absolute-git-dir"))

    # -- 1. refuse states a stash would make worse; nothing has been touched yet --
    _check_pending(rep, git, repo, git_dir)  # first: a killed sync may also have left a rebase
    what = in_progress(git_dir)
    if what:
        _refuse(rep, f"{repo}: the repository is in the middle of {what}; finish or abort it "
                     "first (see git status) — nothing was changed")
    if git.out("ls-files", "--unmerged"):
        _refuse(rep, f"{repo}: there are unresolved conflicts (git status shows them); resolve "
                     "them first — nothing was changed")
    sym = git("symbolic-ref", "-q", "HEAD", check=False)
    if sym.returncode != 0:
        _refuse(rep, f"{repo}: detached HEAD (not on a branch); check out a branch first "
                     "— nothing was changed")
    rep.branch = sym.stdout.strip().removeprefix("refs/heads/")
    head = git("rev-parse", "-q", "--verify", "HEAD^{commit}", check=False)
    if head.returncode != 0:
        _refuse(rep, f"{repo}: branch {rep.branch} has no commits yet — nothing was changed")
    rep.before = rep.after = head.stdout.strip()
    up = git("rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}", check=False)
    if up.returncode != 0:
        _refuse(rep, f"{repo}: branch {rep.branch} has no upstream configured; set one with "
                     f"git branch --set-upstream-to=origin/{rep.branch} — nothing was changed")
    rep.upstream = up.stdout.strip()
    remote = git("config", f"branch.{rep.branch}.remote", check=False).stdout.strip() or "."

    # -- 2. fetch on its own: a network failure happens before anything local is touched --
    if fetch and remote != ".":
        try:
            git("fetch", "--quiet", remote, network=True, extra_env=_net_env(git))
        except GitFailed as e:
            rep.status, rep.exit_code = "pull-failed", FAILED
            rep.message = (f"fetch from {remote} failed, nothing was changed: "
                           f"{exit_text(e.code, e.stderr) if e.code >= 0 else e}")
            raise _Stop from None
    elif not fetch:
        rep.notes.append(f"not fetched: using {rep.upstream} as last fetched")
    upstream_sha = git.out("rev-parse", "@{upstream}^{commit}")
    counts = git.out("rev-list", "--left-right", "--count", "HEAD...@{upstream}").split()
    rep.ahead, rep.behind = int(counts[0]), int(counts[1])
    if rep.behind:
        log_lines = git.out("log", "--format=%h %s", f"-{MAX_COMMITS_LISTED}",
                            "HEAD..@{upstream}").splitlines()
        rep.commits, rep.commits_total = log_lines, rep.behind
    entries = status_entries(git)

    if rep.behind == 0:
        rep.status, rep.exit_code = "up-to-date", OK
        rep.message = (f"{rep.branch} is up to date with {rep.upstream}"
                       + (f" ({plural(rep.ahead, 'local commit')} not pushed)" if rep.ahead else "")
                       + "; nothing stashed, nothing changed")
        raise _Stop
    if mode == "ff-only" and rep.ahead:
        rep.status, rep.exit_code = "pull-failed", FAILED
        rep.message = (f"{rep.branch} has diverged from {rep.upstream} ({rep.ahead} local, "
                       f"{plural(rep.behind, 'upstream commit')}); a fast-forward is impossible — "
                       "nothing was changed; use --rebase or --merge")
        raise _Stop

    moved = _check_collisions(rep, git, repo, entries, upstream_sha)
    entries = status_entries(git)  # without the other repositories' paths, which stay put

    if dry_run:
        rep.stashed = entries
        changed_up = set(git.out("diff", "--name-only", "HEAD", upstream_sha).splitlines())
        if moved:
            rep.notes.append(f"would check out {plural(len(moved), 'submodule')} "
                             f"{', '.join(moved)} at the upstream's recorded commit")
        local_paths = {e[3:] for e in entries}
        rep.overlap = sorted(local_paths & changed_up)
        verb = {"ff-only": "fast-forward", "rebase": f"rebase {plural(rep.ahead, 'local commit')} onto",
                "merge": "merge"}[mode]
        parts = [f"would {verb} {rep.upstream} ({plural(rep.behind, 'commit')})"]
        if entries:
            parts.insert(0, f"would stash {plural(len(entries), 'local change')}")
            parts.append("re-apply them" + (f" (may conflict in: {', '.join(rep.overlap)})"
                                             if rep.overlap else ""))
        rep.status, rep.exit_code, rep.message = "would-sync", OK, ", ".join(parts)
        raise _Stop

    prog.git = git
    _apply_sync(rep, git, mode, entries, upstream_sha, moved, prog)


def _some(paths: Sequence[str], n: int = 5) -> str:
    return ", ".join(paths[:n]) + (f" (+{len(paths) - n} more)" if len(paths) > n else "")


def _check_collisions(rep: SyncReport, git: Git, repo: Path, entries: list[str],
                      upstream_sha: str) -> list[str]:
    """Refuse, before anything is touched, what a stash-and-pull would lose or half-do:

    * a file the upstream adds that exists here untracked or ignored (a stash would bury the
      user's copy in its untracked parent; an ignored one git would overwrite outright), or a
      path the upstream needs as a folder where a file (or another repository) sits;
    * a submodule with local changes of any kind (edits, untracked files, another commit)
      that the upstream moves: ``git stash`` cannot take what is inside a submodule.

    Submodules and nested repositories the upstream leaves alone are left alone (as ``git pull
    --autostash`` does). Returns the clean, checked-out submodules the upstream moves: they are
    checked out at the new commit after the pull, so the tree ends as the upstream has it."""
    links, nested = other_repos(git, entries)
    git.skip = tuple(links) + tuple(nested)
    dirty = {e[3:] for e in entries if e[3:] in links}
    changed = set(git.out("diff", "--name-only", "--no-renames", "-z",
                          f"HEAD...{upstream_sha}").split("\0")) - {""}
    added = [p for p in git.out("diff", "--name-only", "--no-renames", "-z",
                                "--diff-filter=A", "HEAD", upstream_sha).split("\0") if p]
    tracked = set(git.out("ls-files", "-z").split("\0"))
    clash: set[str] = set()
    for path in added:
        if path in tracked:
            continue  # staged as new here too: the stash holds it, a re-apply merges it
        if os.path.lexists(repo / path):
            clash.add(path)
            continue
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            full = repo / d
            if d in nested or (os.path.lexists(full) and d not in tracked
                               and (full.is_symlink() or not full.is_dir())):
                clash.add(d)
                break
    if clash:
        c = sorted(clash)
        _refuse(rep, f"{repo}: the upstream adds {_some(c)}, which you have here untracked or "
                     f"ignored — a pull would bury or overwrite your copy; move it "
                     f"aside (e.g. mv {c[0]} {c[0]}.mine) and sync again — nothing was changed")
    moving = sorted(dirty & changed)
    if moving:
        _refuse(rep, f"{repo}: submodule {_some(moving)} has local changes (git -C {moving[0]} "
                     "status) and the upstream moves it; commit or stash them inside it, or "
                     f"git submodule update {moving[0]} to drop back to the recorded commit, "
                     "then sync again — nothing was changed")
    if dirty:
        rep.notes.append(f"{plural(len(dirty), 'submodule')} with local changes left alone "
                         f"(the upstream does not move them): {_some(sorted(dirty))}")
    if nested:
        rep.notes.append(f"{plural(len(nested), 'nested repository', 'nested repositories')} "
                         f"left alone: {_some(nested)}")
    return [p for p in links if p in changed and p not in dirty
            and os.path.lexists(repo / p / ".git")]


def _apply_sync(rep: SyncReport, git: Git, mode: str, entries: list[str],
                upstream_sha: str, moved: list[str], prog: _Progress) -> None:
    before = rep.before
    assert before is not None
    # microseconds too: two syncs of one process within a second (a library caller, a test)
    # must not share a backup ref, or the second one's cleanup deletes the first's
    now = time.time()
    stamp = prog.stamp = (time.strftime("%Y%m%dT%H%M%S", time.localtime(now))
                          + f".{int(now * 1e6) % 1000000:06d}-{os.getpid()}")
    stash: str | None = None

    # -- 4. stash, and pin it under our own ref at once --
    if entries:
        prog.phase = "stash"
        ident = _committer_env(git)
        msg = f"labkit sync {stamp}: local changes before pulling {rep.upstream}"
        old_top = git("rev-parse", "-q", "--verify", "refs/stash", check=False).stdout.strip()
        # other repositories inside this one (submodules, nested checkouts) are not ours to
        # stash: excluded by name, so the stash takes exactly ``entries``
        skip = [f":(top,literal,exclude){p}" for p in git.skip]
        r = git("stash", "push", "--include-untracked", "-m", msg, *(["--", *skip] if skip
                                                                      else []),
                check=False, extra_env=ident, finish=True)
        stash_sha = git("rev-parse", "-q", "--verify", "refs/stash", check=False).stdout.strip()
        if r.returncode != 0 or not stash_sha or stash_sha == old_top or msg not in git.out(
                "log", "-1", "--format=%s", stash_sha):
            rep.status, rep.exit_code = "error", FAILED
            why = (exit_text(r.returncode, r.stderr + r.stdout) if r.returncode
                   else "no stash was made")
            rep.message = f"git stash failed, nothing pulled: {why}"
            left = status_entries(git)
            if left != entries:
                rep.message += " (the tree changed; see git status and git stash list)"
            raise _Stop
        stash = rep.stash = stash_sha
        rep.stashed = entries
        rep.backup_ref = BACKUP_PREFIX + stamp
        git("update-ref", "-m", "labkit sync backup", rep.backup_ref, stash, finish=True)
        left = status_entries(git)
        if left:
            # stash push left something behind (e.g. a path it could not remove): we will
            # not pull on top of what we could not set aside. The stash stays (and the backup
            # ref) rather than re-applying over the leftovers.
            rep.status, rep.exit_code = "error", FAILED
            rep.stash_kept = _stash_name(git, stash) or stash
            rep.message = (f"git stash left {plural(len(left), 'change')} in the tree; nothing pulled; "
                           f"the rest is in {rep.stash_kept} — restore with "
                           f"git stash pop --index {rep.stash_kept}")
            _mark_kept(git, rep)
            raise _Stop

    # -- 5. integrate the fetched upstream, exactly what git pull does after its fetch --
    prog.phase = "integrate"
    if mode == "ff-only":
        cmd = ["merge", "--ff-only", "--quiet", upstream_sha]
    elif mode == "rebase":
        cmd = ["rebase", "--quiet", upstream_sha]
    else:
        cmd = ["merge", "--no-edit", "--quiet", upstream_sha]
    r = git(*cmd, check=False)
    if r.returncode != 0:
        conflicts = git.out("diff", "--name-only", "--diff-filter=U").splitlines()
        _abort_integration(git, before)
        why = (f"conflicts in {', '.join(conflicts)}" if conflicts
               else exit_text(r.returncode, r.stderr + r.stdout))
        failed = (f"git {cmd[0]} of {rep.upstream} failed ({why}); aborted, {rep.branch} is "
                  f"back at {_short(before)}")
        if stash:
            prog.phase = "apply"
            _reapply(rep, git, stash, after_pull=False)
            if not rep.restored:  # kept in the stash; _reapply said where and how
                rep.message = failed + "; " + rep.message
                raise _Stop
        rep.conflicts = conflicts
        rep.status, rep.exit_code = "pull-failed", FAILED
        rep.message = failed + (", local changes restored" if stash else "") + \
            " — nothing was lost"
        raise _Stop
    rep.after = git.out("rev-parse", "HEAD")

    # -- 6. re-apply; drop only after a clean apply --
    if stash:
        prog.phase = "apply"
        _reapply(rep, git, stash, after_pull=True)
        if rep.status == "apply-conflict":
            raise _Stop
    prog.phase = "done"
    _update_submodules(rep, git, moved)
    rep.status, rep.exit_code = "synced", OK
    pulled = f"pulled {plural(rep.behind, 'commit')} from {rep.upstream}"
    rep.message = (f"{pulled}: {_short(before)} -> {_short(rep.after)}"
                   + (f"; {plural(len(entries), 'local change')} restored" if stash else ""))
    _prune_backups(git)


def _update_submodules(rep: SyncReport, git: Git, moved: list[str]) -> None:
    """Check out the clean submodules the pull moved at their new recorded commits (fetching
    inside them when the commit is not there yet): what the user would otherwise have to do by
    hand before the next sync. A failure is a note with the command, not a failed sync: the
    pull itself succeeded and nothing local was at stake (those submodules were clean)."""
    still = set(ln.split("\t", 1)[1] for ln in git.out("ls-files", "-s", "-z").split("\0")
                if ln.startswith("160000 "))
    moved = [p for p in moved if p in still]
    if not moved:
        return
    r = git("submodule", "update", "--checkout", "--", *moved, check=False, network=True,
            extra_env=_net_env(git))
    if r.returncode == 0:
        rep.notes.append(f"{plural(len(moved), 'submodule')} checked out at the upstream's "
                         f"recorded commit: {', '.join(moved)}")
    else:
        rep.notes.append(f"{plural(len(moved), 'submodule')} could not be checked out at "
                         f"the upstream's recorded commit ({exit_text(r.returncode, r.stderr)}); run "
                         "git submodule update -- "
                         + " ".join(moved))


def _abort_integration(git: Git, before: str) -> None:
    """Undo a failed merge/rebase so HEAD and the (stashed, hence clean) tree are as before."""
    git_dir = Path(git.out("rev-parse", "--absolute-git-dir"))
    if (git_dir / "rebase-merge").exists() or (git_dir / "rebase-apply").exists():
        git("rebase", "--abort", check=False)
    if (git_dir / "MERGE_HEAD").exists():
        git("merge", "--abort", check=False)
    if git.out("rev-parse", "HEAD") != before or status_entries(git):
        # Safe only because every local change is in the stash (and our backup ref): the tree
        # holds nothing but what the failed integration wrote.
        git("reset", "--quiet", "--hard", before)
        git("clean", "-fdq")


def _stash_name(git: Git, stash: str) -> str | None:
    for i, sha in enumerate(git.out("stash", "list", "--format=%H").splitlines()):
        if sha == stash:
            return f"stash@{{{i}}}"
    return None


def _reapply(rep: SyncReport, git: Git, stash: str, *, after_pull: bool) -> None:
    """``git stash apply --index``; without ``--index`` if only the index split cannot be
    rebuilt (and nothing was written); drop the stash after a clean apply, keep it otherwise."""
    r = git("stash", "apply", "--index", "--quiet", stash, check=False, finish=True)
    if r.returncode != 0 and not status_entries(git) and not git.out("ls-files", "--unmerged"):
        # Nothing written: typically "conflicts in index. Try without --index."
        r2 = git("stash", "apply", "--quiet", stash, check=False, finish=True)
        if r2.returncode == 0 or status_entries(git):
            rep.index_restored = False
            rep.notes.append("staged changes could not be re-staged on the new commits; they "
                             "are back as unstaged changes (git add them again)")
        r = subprocess.CompletedProcess(r2.args, r2.returncode, r2.stdout,
                                        r.stderr + r2.stderr)
    unmerged = git.out("diff", "--name-only", "--diff-filter=U").splitlines()
    collisions = re.findall(r"^(.+) already exists, no checkout$", r.stderr + r.stdout, re.M)
    if r.returncode == 0 and not unmerged:
        name = _stash_name(git, stash)
        if name:
            git("stash", "drop", "--quiet", name, check=False, finish=True)
        rep.restored = True
        return
    _report_kept(rep, git, stash, unmerged, collisions, after_pull)


def _report_kept(rep: SyncReport, git: Git, stash: str, unmerged: list[str],
                 collisions: list[str], after_pull: bool) -> None:
    """The re-apply conflicted: never drop. Say where everything is and how to get back,
    and mark the stash as handed over (``_mark_kept``): the next sync lets it be."""
    beside = _keep_beside(git, stash, collisions)
    rep.conflicts = sorted(set(unmerged) | set(collisions)) or [
        e[3:] for e in status_entries(git)]
    name = _stash_name(git, stash) or stash
    rep.stash_kept = name
    rep.status, rep.exit_code = "apply-conflict", FAILED
    where = f"on {_short(rep.after)} after pulling" if after_pull else \
        f"on the unchanged {_short(rep.before)} after the pull failed"
    rep.message = (f"re-applying local changes conflicted {where} in: "
                   f"{', '.join(rep.conflicts) or '(see git status)'}; they are kept in "
                   f"{name} ({_short(stash)}) and {rep.backup_ref} — nothing was lost")
    if beside:
        rep.notes.append("your own copies of files the upstream added are beside them: "
                         + ", ".join(f"{p} -> {b}" for p, b in beside))
    rep.recovery = _recovery(git, rep, stash, name, unmerged, after_pull)
    _mark_kept(git, rep)


def _keep_beside(git: Git, stash: str, collisions: list[str]) -> list[tuple[str, str]]:
    """A file the user had untracked that the pull brought in as tracked stays only in the
    stash's untracked parent; put the user's copy back beside the upstream's (``X.mine``, or
    ``X.mine.2`` ...), so no later command on the stash can be the one that loses it."""
    kept = []
    for path in collisions:
        blob = subprocess.run(["git", "-C", str(git.repo), "cat-file", "blob",
                               f"{stash}^3:{path}"], capture_output=True, env=git.env,
                              stdin=subprocess.DEVNULL, timeout=120)
        if blob.returncode != 0:
            continue
        target, n = f"{path}.mine", 1
        while os.path.lexists(git.repo / target):
            n += 1
            target = f"{path}.mine.{n}"
        with open(git.repo / target, "xb") as f:
            f.write(blob.stdout)
        kept.append((path, target))
    return kept


def _recovery(git: Git, rep: SyncReport, stash: str, name: str, unmerged: list[str],
              after_pull: bool) -> list[str]:
    """What to do next, each a command that loses nothing (tests run every one): the stash is
    only dropped where the backup ref still holds it, and going back removes only the files
    the stash itself restores before applying it again."""
    import shlex

    short = _short(stash)
    has_untracked = git.ok("rev-parse", "-q", "--verify", f"{stash}^3")
    clean = (f"git ls-tree -r -z --name-only {short}^3 | xargs -0 -r git clean -fq -- && "
             if has_untracked else "")
    add = ("git add -- " + " ".join(shlex.quote(p) for p in unmerged)) if unmerged else \
        "git add -- FILE"
    return [
        f"see what you had: `git stash show -p --include-untracked {short}`",
        f"finish: edit the conflicted files, then `{add}`; your changes stay in {name} and "
        f"{rep.backup_ref} — `git stash drop {name}` when you no longer need the stash "
        f"entry ({rep.backup_ref} keeps the same commit)",
        "or go back to exactly before the sync"
        + (" (undoing the pull too)" if after_pull else "") + ", from the top of the tree: "
        f"`git reset -q --hard {_short(rep.before)} && {clean}"
        f"git stash apply -q --index {short}`",
    ]


def _prune_backups(git: Git) -> None:
    """Keep the newest KEEP_BACKUPS backup refs; they are cheap but should not pile up. Never
    the backup of a stash still in the stash list, however old: it may be the only copy left
    once that stash is dropped. Kept-markers go with their stash."""
    listed = set(git.out("stash", "list", "--format=%H").split())
    rows = [ln.split(" ", 1) for ln in git.out(
        "for-each-ref", "--sort=-refname", "--format=%(objectname) %(refname)",
        BACKUP_PREFIX).splitlines()]
    for sha, ref in rows[KEEP_BACKUPS:]:
        if sha not in listed:
            git("update-ref", "-d", ref, check=False)
    for ln in git.out("for-each-ref", "--format=%(objectname) %(refname)",
                      KEPT_PREFIX).splitlines():
        sha, ref = ln.split(" ", 1)
        if sha not in listed:
            git("update-ref", "-d", ref, check=False)


def _mark_kept(git: Git, rep: SyncReport) -> None:
    """Record that the report handed this sync's stash to the user (see KEPT_PREFIX)."""
    if rep.backup_ref and rep.stash:
        git("update-ref", KEPT_PREFIX + rep.backup_ref.removeprefix(BACKUP_PREFIX), rep.stash,
            check=False, finish=True)


def _pending(git: Git) -> list[tuple[str, str, str]]:
    """(stash@{N}, sha, stamp) of each labkit sync stash in the stash list that no report
    handed over (no kept-marker): what a sync killed before re-applying left. Newest first."""
    kept = {ref.removeprefix(KEPT_PREFIX) for ref in git.out(
        "for-each-ref", "--format=%(refname)", KEPT_PREFIX).splitlines()}
    found = []
    listing = git("stash", "list", "--format=%H %s", check=False).stdout
    for i, ln in enumerate(listing.splitlines()):
        sha, _, subject = ln.partition(" ")
        m = STASH_RE.search(subject)
        if m and m.group(1) not in kept:
            found.append((f"stash@{{{i}}}", sha, m.group(1)))
    return found


def _restore_command(git: Git, git_dir: Path, name: str) -> str:
    """The one command that puts a pending stash back, from the state the tree is in."""
    first = {"a rebase": "git rebase --abort && ", "a rebase or am": "git rebase --abort && ",
             "a merge": "git merge --abort && "}.get(in_progress(git_dir) or "", "")
    return f"{first}git stash pop --index {name}"


def _check_pending(rep: SyncReport, git: Git, repo: Path, git_dir: Path) -> None:
    """Refuse (exit 2, like every state a sync would make worse) while a stash of an earlier
    sync that was killed before re-applying it is still in the stash list: that sync said
    nothing, so this one must — and before it stashes anything on top."""
    pending = _pending(git)
    if not pending:
        return
    name, sha, stamp = pending[0]
    backup = BACKUP_PREFIX + stamp
    also = f", also {backup}" if git.ok("rev-parse", "-q", "--verify", backup) else ""
    restore = _restore_command(git, git_dir, name)
    rep.stash, rep.stash_kept = sha, name
    rep.recovery = [f"restore: `{restore}`"]
    if status_entries(git):
        rep.recovery.append(f"or, if those changes are in your tree already (it was stopped "
                            f"after re-applying them): `git stash drop {name}`")
    more = f" ({len(pending) - 1} more after it)" if len(pending) > 1 else ""
    _refuse(rep, f"{repo}: a labkit sync was stopped before it put your local changes back; "
                 f"they are in {name} ({_short(sha)}{also}){more} — restore them with "
                 f"`{restore}`" + (f" (or `git stash drop {name}` if your tree has them "
                                   "already)" if len(rep.recovery) > 1 else "")
                 + ", then sync again — nothing was changed")


def _find_stash(git: Git, stamp: str) -> str | None:
    """This sync's stash in the stash list (by the stamp in its message), if it is there."""
    for ln in git.out("stash", "list", "--format=%H %s").splitlines():
        sha, _, subject = ln.partition(" ")
        m = STASH_RE.search(subject)
        if m and m.group(1) == stamp:
            return sha
    return None


def _after_interrupt(rep: SyncReport, prog: _Progress) -> None:
    """The clean-up after Ctrl-C / SIGTERM / SIGHUP: what a failed step gets. Nothing touched
    yet -> nothing to do. Else a half-done pull is undone (a finished one kept), the stash
    re-applied and dropped; a conflict keeps it and says how to finish, as a failed sync
    does. If the clean-up itself fails, the report says where the changes are and the exact
    command that puts them back (and the next sync will refuse until that is done)."""
    rep.status, rep.exit_code = "interrupted", FAILED
    git = prog.git
    if git is None or prog.phase == "check":
        rep.message = "interrupted before anything was changed"
        rep.recovery = rep.notes = []
        return
    try:
        _restore_after_interrupt(rep, git, prog)
        rep.status, rep.exit_code = "interrupted", FAILED  # also when a conflict kept it
    except (GitFailed, KeyboardInterrupt, OSError) as e:
        stash = rep.stash or ""
        rep.message = f"interrupted, and the clean-up failed ({e or type(e).__name__})"
        try:
            stash = _find_stash(git, prog.stamp) or ""
            if stash:
                name = _stash_name(git, stash) or stash
                git_dir = Path(git.out("rev-parse", "--absolute-git-dir"))
                rep.recovery = [f"restore: `{_restore_command(git, git_dir, name)}`"]
        except (GitFailed, KeyboardInterrupt, OSError):
            rep.recovery = [f"restore: `git stash apply --index {stash}`"] if stash else []
        if stash:
            rep.message += (f"; your local changes are in the stash {_short(stash)} "
                            f"({rep.backup_ref or 'see git stash list'}) — "
                            + rep.recovery[0].removeprefix("restore: "))


def _restore_after_interrupt(rep: SyncReport, git: Git, prog: _Progress) -> None:
    before = rep.before
    assert before is not None
    git_dir = Path(git.out("rev-parse", "--absolute-git-dir"))
    stash = _find_stash(git, prog.stamp)
    half_done = prog.phase == "integrate" and (in_progress(git_dir) is not None
                                              or bool(status_entries(git)))
    if half_done and (stash or not rep.stashed):
        # every local change is in the stash (or there were none): safe to reset
        _abort_integration(git, before)
    rep.after = git.out("rev-parse", "HEAD")
    pulled = rep.after != before
    where = (f"after pulling {_short(before)} -> {_short(rep.after)}" if pulled
             else f"before pulling; {rep.branch} is still at {_short(before)}")
    if stash is None:
        # nothing stashed, or already re-applied and dropped
        rep.message = (f"interrupted {where}"
                       + ("; local changes restored" if rep.stashed else "")
                       + " — nothing was lost")
        rep.restored = bool(rep.stashed)
        return
    rep.stash = stash
    if not rep.backup_ref:
        rep.backup_ref = BACKUP_PREFIX + prog.stamp
        git("update-ref", "-m", "labkit sync backup", rep.backup_ref, stash, finish=True)
    unmerged = git.out("diff", "--name-only", "--diff-filter=U").splitlines()
    if not status_entries(git):
        _reapply(rep, git, stash, after_pull=pulled)   # drops it when clean
    elif prog.phase == "apply" and not unmerged:
        # applied in full before the interrupt: only the drop was left
        name = _stash_name(git, stash)
        if name:
            git("stash", "drop", "--quiet", name, check=False, finish=True)
        rep.restored = True
    else:
        # re-applied with conflicts (or stash left changes behind): keep it, say how to go on
        _report_kept(rep, git, stash, unmerged, [], after_pull=pulled)
    if rep.restored:
        rep.message = f"interrupted {where}; local changes restored — nothing was lost"
    else:
        rep.message = "interrupted; " + rep.message


# --- presentation ------------------------------------------------------------------------

def format_report(rep: SyncReport) -> str:
    """A few lines a person reads after ``invoke sync``."""
    lines = [("dry run: " if rep.dry_run else "") + rep.message]
    if rep.branch:
        lines.append(f"  repo      {rep.repo}  ({rep.branch} <- {rep.upstream or '-'}, "
                     f"mode {rep.mode})")
    if rep.before:
        lines.append(f"  revision  {_short(rep.before)}"
                     + (f" -> {_short(rep.after)}" if rep.after != rep.before else " (unchanged)"))
    if rep.commits:
        what = "pulled  " if rep.after != rep.before else "incoming"
        lines.append(f"  {what}  {plural(rep.commits_total, 'commit')}:")
        lines += [f"    {c}" for c in rep.commits]
        if rep.commits_total > len(rep.commits):
            lines.append(f"    ... and {rep.commits_total - len(rep.commits)} more")
    if rep.stashed:
        verb = "would stash" if rep.dry_run else ("stashed and restored" if rep.restored
                                                 else "stashed")
        lines.append(f"  {verb} {plural(len(rep.stashed), 'change')}: "
                     + ", ".join(e[3:] for e in rep.stashed[:15])
                     + (" ..." if len(rep.stashed) > 15 else ""))
    if rep.overlap:
        lines.append(f"  also changed upstream: {', '.join(rep.overlap)}")
    if rep.conflicts:
        lines.append(f"  conflicts: {', '.join(rep.conflicts)}")
    if rep.backup_ref and not rep.dry_run:
        lines.append(f"  backup    {rep.backup_ref} -> {_short(rep.stash)} "
                     "(the stash commit; safe to delete with git update-ref -d)")
    lines += [f"  note: {n}" for n in rep.notes]
    if rep.recovery:
        lines.append("  to finish:")
        lines += [f"    {c}" for c in rep.recovery]
    return "\n".join(lines)


# --- standalone: the same code on a node, as `python3 - ARGS` with this file on stdin ------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labkit-sync")
    ap.add_argument("--repo", default=None)
    ap.add_argument("--mode", choices=MODES, default="ff-only")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-fetch", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    repo = os.path.expanduser(a.repo) if a.repo else None
    # On a node nothing installs labkit.signals: SIGTERM/SIGHUP would kill this process on
    # the spot, between stash and re-apply. Make them Ctrl-C (the first one only), so the
    # clean-up runs here too.
    got: list[int] = []

    def on_signal(signo: int, frame: object) -> None:
        if not got:
            got.append(signo)
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, on_signal)
    try:
        rep = sync_repo(repo, mode=a.mode, dry_run=a.dry_run, fetch=not a.no_fetch,
                        timeout=a.timeout)
    except SyncInterrupted as e:
        rep = e.report
        print(json.dumps(rep.to_json()) if a.json else format_report(rep), flush=True)
        return 128 + (got[0] if got else signal.SIGINT)
    print(json.dumps(rep.to_json()) if a.json else format_report(rep))
    return rep.exit_code


def remote_command(repo: str | None, *, mode: str, dry_run: bool, fetch: bool,
                   timeout: float) -> str:
    """The command line run on a node; this module's source goes on its stdin."""
    import shlex

    args = ["python3", "-", "--json", "--mode", mode, "--timeout", str(timeout)]
    if repo:
        args += ["--repo", repo]
    if dry_run:
        args.append("--dry-run")
    if not fetch:
        args.append("--no-fetch")
    return " ".join(shlex.quote(a) for a in args)


def sync_nodes(settings: Settings, nodes: Sequence[Node], repo: str | None, *,
               mode: str = "ff-only", dry_run: bool = False, fetch: bool = True,
               pool: ShellPool | None = None) -> list[Outcome]:
    """``sync --nodes``: run this very module on each of ``nodes`` (already selected, leases
    checked) over SSH (``python3 -`` with the source on stdin) through THE fan-out; one Outcome
    per node carrying its report. Takes settings and nodes, not the task layer's ``Lab``: the
    library never reaches up into tasks. ``pool``: the caller's shells (kept open); None opens
    one for this call."""
    from labkit.errors import NodeError
    from labkit.fanout import fan_out
    from labkit.ssh import ConnectionPool
    from labkit.ssh.errors import exit_text as ssh_exit_text

    source = Path(__file__).read_bytes()
    cmd = remote_command(repo, mode=mode, dry_run=dry_run, fetch=fetch,
                         timeout=settings.command_timeout)
    own = pool is None
    shells: ShellPool = pool if pool is not None else ConnectionPool(settings)

    def action(node: Node) -> dict[str, Any]:
        client = shells.get(node)
        r = client.run(cmd, input=source, timeout=settings.command_timeout + settings.ssh_timeout)
        try:
            data = json.loads(r.stdout.decode(errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            if r.timed_out:
                why = f"timed out after {r.seconds:.1f}s"
            elif r.exit_code is None:
                why = "no exit status (killed or connection lost)"
            else:
                why = ssh_exit_text(r.exit_code, r.stderr)
            raise NodeError(f"sync script failed on the node: {why}") from None
        value = {"status": data.get("status"), "before": _short(data.get("before")),
                 "after": _short(data.get("after")), "pulled": data.get("commits_total", 0),
                 "stashed": len(data.get("stashed") or []),
                 "conflicts": ",".join(data.get("conflicts") or []) or None, "report": data}
        if data.get("exit_code", 1) != 0:
            msg = data.get("message") or "sync failed"
            if data.get("recovery"):
                msg += " | " + " | ".join(data["recovery"])
            raise NodeError(msg, value=value)
        return value

    try:
        return fan_out(nodes, action, parallel=settings.parallel, label="sync",
                       progress=settings.progress)
    finally:
        if own:
            shells.close_all()


if __name__ == "__main__":
    sys.exit(main())
