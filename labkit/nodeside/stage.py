"""Deploy's agent on a node: stage a release, roll back, clean leftovers, hash-check — under the
node's lock, with answers the controller can parse exactly.

    python3 stage.py stage    WORKDIR STALL_SECONDS     the plan line, then file bytes, on stdin
    python3 stage.py rollback WORKDIR LOCK_WAIT   refused when previous was edited since built
    python3 stage.py clean    WORKDIR LOCK_WAIT
    python3 stage.py probe    WORKDIR 0 [hash|stat]     read-only; hashes every file of current

Prints one JSON object on stdout (``stage`` prints ``@ack N`` progress lines before it); exit 0
when done, 3 for a refusal or failure described in the JSON (``{"error": ...}``).

The layout it keeps under WORKDIR (see ``labkit.deploy`` for why)::

    payloads/releases/<id>/            MANIFEST and .labkit-stat written last
    payloads/releases/.incoming-<id>/  being assembled; never pointed at
    payloads/current, previous         symlinks replaced with rename(2)
    payloads/.lock                     flock, holding who has it

Python, not sh, for this part: flock, rename and exact JSON answers are what a portable shell
script cannot give. The cheap read-only probe of an unchanged redeploy is ``probe.sh``.
Runs with the node's python3 (3.6+), stdlib only; shipped by ``labkit.nodeside.command``.
"""

import errno
import fcntl
import hashlib
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import time

MANIFEST = "MANIFEST"
STAT_INDEX = ".labkit-stat"
PYTHON_CHECK = "python-check"  # the default build: compile every .py file, write nothing
FAILED = 3
ACK_LINE = "@ack %d\n"  # progress lines the controller's flow control waits on


class Answer(Exception):
    """Ends an operation with its JSON answer (a refusal when ``code`` is FAILED)."""

    def __init__(self, obj, code=0):
        super().__init__(obj)
        self.obj = obj
        self.code = code


class Stalled(Exception):
    """The controller sent nothing for the stall timeout."""


def writeall(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Input:
    """stdin with a stall timeout: a controller that goes silent (hung, stopped, or a session
    the server failed to tear down) must not hold the node's lock forever."""

    def __init__(self, idle, fd=0):
        self.fd, self.idle, self.buf = fd, idle, b""

    def _wait(self):
        if not select.select([self.fd], [], [], self.idle)[0]:
            raise Stalled()

    def line(self):
        while b"\n" not in self.buf:
            self._wait()
            b = os.read(self.fd, 1 << 16)
            if not b:
                return None
            self.buf += b
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def read(self, n):
        if self.buf:
            b, self.buf = self.buf[:n], self.buf[n:]
            return b
        self._wait()
        return os.read(self.fd, min(n, 1 << 20))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path):
    """syncfs(2) of the filesystem holding ``path``; False where libc lacks it."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
# copy_file_range(2) cannot serve this pair (another filesystem on an old kernel, a filesystem
# without it, a kernel or libc without the call): copy through user space instead
# (EPERM: a container's seccomp profile that predates the call)
NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}
# the new release cannot be written at all: sending the file instead would fail the same way
NODE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def plural(n, word, many=None):
    """``1 file``, ``2 files``. A copy of ``labkit.text.plural``: this program runs on nodes
    with the stdlib only and imports nothing from labkit."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def clone(fdr, fdw):
    """Reflink ``fdr`` into ``fdw`` (btrfs, XFS, ...): blocks shared copy-on-write, the inode
    not. False where the filesystem cannot."""
    try:
        fcntl.ioctl(fdw, FICLONE, fdr)
        return True
    except OSError:
        return False


def copy_data(fdr, fdw, h=None):
    """Copy the rest of ``fdr`` to ``fdw``. Without a hash to feed, in the kernel with
    copy_file_range(2) (no trip through user space; on NFS 4.2 a server-side copy, and a
    reflink by itself where the filesystem can), falling back to a read/write loop where the
    call is missing or refuses the pair; with ``h``, read/write, hashing the same pass."""
    if h is None and hasattr(os, "copy_file_range"):  # python >= 3.8
        try:
            while os.copy_file_range(fdr, fdw, 1 << 30):
                pass
            return
        except OSError as e:
            if e.errno not in NO_KERNEL_COPY:
                raise
            # the file positions say how far it got; the loop below goes on from there
    while True:
        b = os.read(fdr, 1 << 20)
        if not b:
            return
        if h is not None:
            h.update(b)
        writeall(fdw, b)


class Seal:
    """What a release looked like when it was built, from its ``.labkit-stat`` index (size,
    mtime_ns, mode per file) and the index file's own mtime (the marker, written last): a file
    whose size and mtime still match and whose ctime is not after the marker has not been
    touched since (an edit can put size and mtime back, never ctime). The stage agent waits for
    the file clock to pass the marker before it publishes a release, so an edit made in the
    same clock tick as the marker is after it too. A marker whose mtime is after its own ctime
    was moved forward by hand (touch -d): nothing in that release is trusted by stat."""

    def __init__(self, folder):
        self.index, self.mark = {}, None
        try:
            st = os.stat(os.path.join(folder, STAT_INDEX))
            with open(os.path.join(folder, STAT_INDEX)) as f:
                index = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(index, dict) and st.st_mtime_ns <= st.st_ctime_ns:
            self.index, self.mark = index, st.st_mtime_ns

    def untouched(self, path, st):
        """True when ``st`` (a stat of ``path``) shows the file as it was built."""
        e = self.index.get(path)
        return (self.mark is not None and isinstance(e, list) and len(e) >= 2
                and stat.S_ISREG(st.st_mode) and st.st_size == e[0]
                and st.st_mtime_ns == e[1] and st.st_ctime_ns <= self.mark)


def copy_kept(src, dst, seal, path, want):
    """Copy ``src`` (file ``path`` of a release on this node, sealed by ``seal``) to the new
    file ``dst`` (an inode of its own, so an edit in one release never reaches another);
    True when ``dst`` holds what the MANIFEST entry ``want`` promises.

    The source is judged by the stat of the open file: untouched since its release was built
    (see ``Seal``), it is copied in the kernel and not read again; a second stat after the
    copy proves no write landed during it. Otherwise its bytes are hashed as they are copied
    (a touch or a chmod leaves them intact, an edit does not); after a reflink, what the clone
    holds is hashed, not what the source holds by then."""
    fdr = os.open(src, os.O_RDONLY)
    try:
        fdw = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            cloned = clone(fdr, fdw)
            if not cloned:
                if not seal.untouched(path, os.fstat(fdr)):
                    h = hashlib.sha256()
                    copy_data(fdr, fdw, h)
                    return h.hexdigest() == want["sha256"]
                copy_data(fdr, fdw)
            st = os.fstat(fdr)
            if seal.untouched(path, st) and st.st_size == want["size"]:
                return True
            h = hashlib.sha256()
            if cloned:
                with open(dst, "rb") as f:
                    for b in iter(lambda: f.read(1 << 20), b""):
                        h.update(b)
            else:  # written to during the copy: copy again, hashing what is written
                os.lseek(fdr, 0, os.SEEK_SET)
                os.lseek(fdw, 0, os.SEEK_SET)
                os.ftruncate(fdw, 0)
                copy_data(fdr, fdw, h)
            return h.hexdigest() == want["sha256"]
        finally:
            os.close(fdw)
    finally:
        os.close(fdr)


def modified_files(folder, files):
    """Files of the release in ``folder`` that differ from its MANIFEST ``files``: missing,
    not regular, another mode, or touched since it was built (by stat, see ``Seal``) and no
    longer holding the promised bytes. Reads only the files whose stat does not vouch for
    them."""
    seal, bad = Seal(folder), []
    for p, fe in files.items():
        fp = os.path.join(folder, p)
        try:
            st = os.lstat(fp)
        except OSError:
            bad.append(p)
            continue
        if (not stat.S_ISREG(st.st_mode) or f"{stat.S_IMODE(st.st_mode):o}" != fe["mode"]
                or st.st_size != fe["size"]):
            bad.append(p)
        elif not seal.untouched(p, st) and sha256(fp) != fe["sha256"]:
            bad.append(p)
    return sorted(bad)


def wait_for_clock(path, limit=5.0):
    """Return once the file clock of ``path``'s filesystem reads later than ``path``'s mtime,
    so that any change made from now on gets a ctime strictly after it (``find -cnewer`` and
    ``Seal`` compare strictly; timestamps come in ticks, from a jiffy to the 1-2 s of old
    filesystems). Seen by setting the mode again, which stamps the ctime. Usually at once:
    syncfs took longer than a tick. Gives up after ``limit`` seconds (a clock set back)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    end = time.time() + limit
    while True:
        os.chmod(path, mode)
        st = os.stat(path)
        if st.st_ctime_ns > st.st_mtime_ns or time.time() > end:
            return
        time.sleep(0.002)


def build(cmd, where, timeout, rid):
    """Run the build in the new release folder; None when it passed, else why it failed."""
    if not cmd:
        return None
    if cmd == PYTHON_CHECK:
        for dirpath, _dirs, names in os.walk(where):
            for n in sorted(names):
                if n.endswith(".py"):
                    p = os.path.join(dirpath, n)
                    with open(p, "rb") as f:
                        src = f.read()
                    try:
                        compile(src, os.path.relpath(p, where), "exec", dont_inherit=True)
                    except (SyntaxError, ValueError) as e:
                        return f"python check: {os.path.relpath(p, where)}: {e}"
        return None
    env = dict(os.environ, LABKIT_RELEASE=rid)
    try:
        r = subprocess.run(cmd, shell=True, cwd=where, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"build {cmd!r} timed out after {timeout}s"
    if r.returncode != 0:
        tail = r.stdout.decode("utf-8", "replace").strip()[-1500:]
        return f"build {cmd!r} exited {r.returncode}: {tail}"
    return None


class Releases:
    """The payloads folder of one workdir, and the operations on it."""

    def __init__(self, workdir, stdin=0, stdout=1):
        self.base = os.path.join(os.path.expanduser(workdir), "payloads")
        self.rels = os.path.join(self.base, "releases")
        self.stdin, self.stdout = stdin, stdout
        self.incoming = []  # removed again if the operation fails

    # -- reading --

    def target(self, name):
        try:
            return os.path.basename(os.readlink(os.path.join(self.base, name)).rstrip("/"))
        except OSError:
            return None

    def leftovers(self):
        """Half-assembled releases and stray temp symlinks, as the node's names for them."""
        try:
            names = os.listdir(self.rels)
        except OSError:
            names = []
        found = sorted(n for n in names if n.startswith(".incoming-"))
        try:
            found += sorted(n for n in os.listdir(self.base) if ".tmp-" in n)
        except OSError:
            pass
        return found

    def describe(self, rid, mode):
        d = os.path.join(self.rels, rid)
        if not os.path.isdir(d):
            return {"id": rid, "error": f"release folder {rid} is gone"}
        try:
            with open(os.path.join(d, MANIFEST)) as f:
                man = json.load(f)
            files = man["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return {"id": rid, "error": f"no readable MANIFEST in {rid} ({e})"}
        info = {k: man.get(k) for k in ("release", "digest", "revision", "dirty",
                                        "deployed_at", "deployed_by", "labkit_version")}
        info.update(id=rid, files=files)
        if mode == "hash":
            missing, modified = [], []
            for p, fe in files.items():
                fp = os.path.join(d, p)
                try:
                    st = os.lstat(fp)
                except OSError:
                    missing.append(p)
                    continue
                if (not stat.S_ISREG(st.st_mode) or st.st_size != fe["size"]
                        or f"{stat.S_IMODE(st.st_mode):o}" != fe["mode"]
                        or sha256(fp) != fe["sha256"]):
                    modified.append(p)
            info["missing"], info["modified"] = missing, modified
        return info

    # -- changing, under the lock --

    def take_lock(self, wait, who=""):
        os.makedirs(self.rels, exist_ok=True)
        fd = os.open(os.path.join(self.base, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        end = time.time() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.time() > end:
                    holder = os.read(fd, 400).decode("utf-8", "replace").strip()
                    os.close(fd)
                    raise Answer({"error": f"another deploy or rollback holds {self.base}/.lock "
                                           f"({holder or 'holder unknown'})"}, FAILED) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.write(fd, f"pid {os.getpid()} on behalf of {who or '?'} since {since}".encode())
        return fd

    def clean(self, names):
        for n in names:
            p = os.path.join(self.rels if n.startswith(".incoming-") else self.base, n)
            if os.path.islink(p) or not os.path.isdir(p):
                os.unlink(p)
            else:
                shutil.rmtree(p)

    def point(self, name, rid):
        tmp = os.path.join(self.base, f".{name}.tmp-{os.getpid()}")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join("releases", rid), tmp)
        os.rename(tmp, os.path.join(self.base, name))

    # -- the operations --

    def probe(self, mode):
        """Read-only: the check's view of the node (``hash`` hashes every file of current)."""
        res = {"leftovers": self.leftovers(), "cleaned": [],
               "releases": sorted(n for n in (os.listdir(self.rels)
                                              if os.path.isdir(self.rels) else [])
                                  if not n.startswith("."))}
        for key in ("current", "previous"):
            rid = self.target(key)
            res[key] = self.describe(rid, mode if key == "current" else None) if rid else None
        return res

    def clean_op(self, lock_wait):
        if not os.path.isdir(self.base):
            return {"cleaned": []}
        fd = self.take_lock(lock_wait)
        found = self.leftovers()
        self.clean(found)
        os.close(fd)
        return {"cleaned": found}

    def rollback(self, lock_wait):
        if not os.path.isdir(self.base):
            raise Answer({"error": "nothing deployed"}, FAILED)
        fd = self.take_lock(lock_wait)
        cur, prev = self.target("current"), self.target("previous")
        if not prev or not os.path.isdir(os.path.join(self.rels, prev)):
            raise Answer({"error": "no previous release to roll back to", "release": cur},
                         FAILED)
        # switching symlinks restores the previous release byte for byte only if nobody
        # edited it in the meantime: checked by stat, hashing only what the stat cannot vouch
        # for; a modified release is refused, not switched to
        info = self.describe(prev, None)
        if info.get("error"):
            raise Answer({"error": "previous release: " + info["error"], "release": cur},
                         FAILED)
        bad = modified_files(os.path.join(self.rels, prev), info["files"])
        if bad:
            more = f" (+{len(bad) - 3})" if len(bad) > 3 else ""
            raise Answer({"error": f"previous release {prev} has {plural(len(bad), 'file')} "
                                   f"modified on the node since it was built "
                                   f"({', '.join(bad[:3])}{more}); not rolled back: deploy "
                                   f"instead",
                          "release": cur, "modified": bad}, FAILED)
        self.point("current", prev)
        if cur:
            self.point("previous", cur)
        fsync_dir(self.base)
        os.close(fd)
        return {"release": prev, "previous": cur}

    def stage(self, stall):
        """Receive one release: the plan (one JSON line), then the bytes of every file it sends,
        in order; link the rest from releases already here; build, make durable, switch."""
        inp = Input(stall, self.stdin)
        head = inp.line()
        if not head:
            raise Answer({"error": "no plan received"}, FAILED)
        plan = json.loads(head.decode())
        fd = self.take_lock(plan["lock_wait"], plan["manifest"].get("deployed_by"))
        cleaned = self.leftovers()
        self.clean(cleaned)
        rid = plan["release"]
        final = os.path.join(self.rels, rid)
        n = 1
        while os.path.lexists(final):
            n += 1
            rid = f"{plan['release']}.{n}"
            final = os.path.join(self.rels, rid)
        inc = os.path.join(self.rels, ".incoming-" + rid)
        self.incoming.append(inc)
        os.mkdir(inc)

        def place(p):
            dst = os.path.join(inc, p)
            parent = os.path.dirname(dst)
            if not os.path.isdir(parent):
                os.makedirs(parent)
            return dst

        def fail(obj):
            shutil.rmtree(inc, ignore_errors=True)
            obj["cleaned"] = cleaned
            return Answer(obj, FAILED)

        # Files kept from a release already here are COPIED (reflinked where the filesystem
        # can), never hard-linked: a release shares no inode with another, so an edit made in
        # place in one (root ignores file modes) cannot reach the others. A source is trusted
        # by its stat when untouched since its release was built, else hashed; one that no
        # longer holds what the new MANIFEST promises is refused here, and the controller
        # sends that file instead.
        changed, seals = [], {}
        for p, (src_rel, src_path) in plan["link"].items():
            src, dst = os.path.join(self.rels, src_rel, src_path), place(p)
            if src_rel not in seals:
                seals[src_rel] = Seal(os.path.join(self.rels, src_rel))
            try:
                same = copy_kept(src, dst, seals[src_rel], src_path,
                                 plan["manifest"]["files"][p])
            except OSError as e:
                if e.errno in NODE_FULL:  # this node's trouble, not the source's: say so
                    raise
                same = False  # the source is gone or unreadable: send it
            if not same:
                changed.append(p)
        if changed:
            raise fail({"error": f"{plural(len(changed), 'kept file')} changed on the node "
                                 f"since its release was built "
                                 f"({', '.join(sorted(changed)[:3])}); nothing switched",
                        "resend": sorted(changed)})
        written = []
        got = acked = 0
        ack_every = plan.get("ack_every") or 0
        for f in plan["send"]:
            dst, left = place(f["path"]), f["size"]
            fdw = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                while left:
                    b = inp.read(min(left, 1 << 20))
                    if not b:
                        raise fail({"error": f"transfer ended early in {f['path']} ({left} "
                                             f"bytes missing); nothing switched"})
                    writeall(fdw, b)
                    left -= len(b)
                    got += len(b)
                    if ack_every and got - acked >= ack_every:
                        acked = got
                        writeall(self.stdout, (ACK_LINE % got).encode())
                os.fchmod(fdw, int(f["mode"], 8))
            finally:
                os.close(fdw)
            written.append(dst)
        if inp.read(1):
            raise fail({"error": "more data than planned; nothing switched"})
        manifest = plan["manifest"]
        manifest["release"] = rid
        # The stat index is taken before the build: a build that rewrites a payload file
        # leaves it unsealed, so it is hashed (and refused) before it is reused or rolled
        # back to. Modes are set first, so the build runs the files as they will run.
        index = {}
        for p, fe in manifest["files"].items():
            st = os.lstat(os.path.join(inc, p))
            mode = int(fe["mode"], 8)
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(os.path.join(inc, p), mode)
                st = os.lstat(os.path.join(inc, p))
            index[p] = [st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)]
        err = build(plan.get("build"), inc, plan.get("build_timeout"), rid)
        if err:
            raise fail({"error": err, "build_failed": True})
        durable = plan.get("fsync", True)
        for name, obj in ((MANIFEST, manifest), (STAT_INDEX, index)):  # the marker last
            with open(os.path.join(inc, name), "w") as f:
                json.dump(obj, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        if durable:
            # Durable before the switch, so a node that loses power right after cannot come
            # back pointing at files that never reached the disk. One pass at the end, not per
            # file while receiving (that stalls the pipe and with it the sender): syncfs(2)
            # where libc has it (one journal commit), else fsync of every new file and folder.
            if not syncfs(inc):
                for p in written:
                    fdr = os.open(p, os.O_RDONLY)
                    try:
                        os.fsync(fdr)
                    finally:
                        os.close(fdr)
                for d in sorted({os.path.dirname(p) for p in written} | {inc}):
                    fsync_dir(d)
        # published only once the file clock is past the marker: an edit made right after the
        # switch, in the marker's own tick, would otherwise look as old as the build
        wait_for_clock(os.path.join(inc, STAT_INDEX))
        os.rename(inc, final)
        old = self.target("current")
        if old and old != rid:
            self.point("previous", old)
        self.point("current", rid)
        if durable:
            fsync_dir(self.rels)
            fsync_dir(self.base)
        keep = {rid, old, self.target("previous")}
        pruned = []
        for n in sorted(os.listdir(self.rels)):
            if not n.startswith(".") and n not in keep:
                shutil.rmtree(os.path.join(self.rels, n), ignore_errors=True)
                pruned.append(n)
        os.close(fd)
        return {"release": rid, "previous": self.target("previous"), "cleaned": cleaned,
                "pruned": pruned}


def run(argv, stdin=0, stdout=1):
    """(answer, exit code) of one operation; ``argv`` as on the command line, without the
    program name."""
    if len(argv) < 3:
        return {"error": "usage: stage.py OP WORKDIR SECONDS [MODE]"}, FAILED
    op, workdir, seconds = argv[0], argv[1], argv[2]
    r = Releases(workdir, stdin, stdout)
    try:
        if op == "probe":
            return r.probe(argv[3] if len(argv) > 3 else "hash"), 0
        if op == "stage":
            return r.stage(float(seconds)), 0
        if op == "rollback":
            return r.rollback(float(seconds)), 0
        if op == "clean":
            return r.clean_op(float(seconds)), 0
        return {"error": f"unknown op {op!r}"}, FAILED
    except Answer as a:
        return a.obj, a.code
    except Stalled:
        for p in r.incoming:
            shutil.rmtree(p, ignore_errors=True)
        return {"error": f"no data from the controller for {seconds}s; gave up, nothing "
                         f"switched"}, FAILED
    except (OSError, ValueError, KeyError) as e:
        for p in r.incoming:
            shutil.rmtree(p, ignore_errors=True)
        return {"error": f"{op} on the node: {e}"}, FAILED


def main(argv):
    answer, code = run(argv)
    writeall(1, json.dumps(answer).encode())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
