"""Kernel interfaces for dirty-page tracking: /proc/PID/maps, userfaultfd write-protect,
PAGEMAP_SCAN, /proc/PID/pagemap, process_vm_readv.

Node-side payload: stdlib + ctypes only (numpy used when importable). Never imports labkit.
x86_64 Linux ABI (see the kernel's include/uapi/linux/userfaultfd.h and fs.h).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from array import array
from typing import NamedTuple

try:  # optional: bulk decode / compare
    import numpy as np
except ImportError:  # pragma: no cover - exercised on nodes without numpy
    np = None

PAGE = mmap.PAGESIZE
PAGE_SHIFT = PAGE.bit_length() - 1

# --- userfaultfd ---------------------------------------------------------------------------
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WRITEPROTECT = 0xC018AA06
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
O_CLOEXEC = os.O_CLOEXEC
O_NONBLOCK = os.O_NONBLOCK
UFFD_FLAGS = O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY

# --- PAGEMAP_SCAN --------------------------------------------------------------------------
PAGEMAP_SCAN = 0xC0606610
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

PM_SOFT_DIRTY_BIT = 55

SYS_userfaultfd = 323
SYS_process_vm_readv = 310

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
memcmp = _libc.memcmp
memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
memcmp.restype = ctypes.c_int


class uffdio_api(ctypes.Structure):  # noqa: N801
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):  # noqa: N801
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):  # noqa: N801
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_writeprotect(ctypes.Structure):  # noqa: N801
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64)]


class page_region(ctypes.Structure):  # noqa: N801
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class pm_scan_arg(ctypes.Structure):  # noqa: N801
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "size flags start end walk_end vec vec_len max_pages category_inverted "
            "category_mask category_anyof_mask return_mask"
        ).split()
    ]


class iovec(ctypes.Structure):  # noqa: N801
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


assert ctypes.sizeof(pm_scan_arg) == 96 and ctypes.sizeof(page_region) == 24


def ioctl(fd: int, req: int, arg: ctypes.Structure | int) -> int:
    addr = arg if isinstance(arg, int) else ctypes.addressof(arg)
    r = _ioctl(fd, req, addr)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"ioctl {req:#x}: {os.strerror(e)}")
    return r


# --- /proc/PID/maps ------------------------------------------------------------------------
class Vma(NamedTuple):
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    name: str

    @property
    def writable_private(self) -> bool:
        return self.perms[1] == "w" and self.perms[3] == "p"

    @property
    def label(self) -> str:
        """A stable, human label: the file/pseudo name, or [anon@START] for anonymous memory."""
        if not self.name:
            return f"[anon@{self.start:x}]"
        if self.name.startswith("[anon:"):
            return f"{self.name[:-1]}@{self.start:x}]"
        return self.name


SKIP_NAMES = ("[vvar]", "[vvar_vclock]", "[vsyscall]", "[vdso]", "[uprobes]")


def read_maps(pid: int) -> list[Vma]:
    out = []
    with open(f"/proc/{pid}/maps", "rb") as f:
        data = f.read()
    for line in data.decode("utf-8", "replace").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        name = parts[5].strip() if len(parts) > 5 else ""
        out.append(Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), int(parts[4]), name))
    return out


# PROCMAP_QUERY (Linux >= 6.11): VMAs by address on an open /proc/PID/maps fd, no text to parse.
PROCMAP_QUERY = 0xC0686611
PROCMAP_QUERY_VMA_READABLE = 0x01
PROCMAP_QUERY_VMA_WRITABLE = 0x02
PROCMAP_QUERY_VMA_EXECUTABLE = 0x04
PROCMAP_QUERY_VMA_SHARED = 0x08
PROCMAP_QUERY_COVERING_OR_NEXT_VMA = 0x10


class procmap_query(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("size", ctypes.c_uint64), ("query_flags", ctypes.c_uint64), ("query_addr", ctypes.c_uint64),
        ("vma_start", ctypes.c_uint64), ("vma_end", ctypes.c_uint64), ("vma_flags", ctypes.c_uint64),
        ("vma_page_size", ctypes.c_uint64), ("vma_offset", ctypes.c_uint64), ("inode", ctypes.c_uint64),
        ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32),
        ("vma_name_size", ctypes.c_uint32), ("build_id_size", ctypes.c_uint32),
        ("vma_name_addr", ctypes.c_uint64), ("build_id_addr", ctypes.c_uint64),
    ]


assert ctypes.sizeof(procmap_query) == 104


class MapsQuery:
    """VMAs intersecting given ranges via PROCMAP_QUERY: ~2 ioctls per range instead of reading
    and parsing all of /proc/PID/maps (which costs ~0.3-0.8 ms for a 150-VMA process).
    `ok` is False when the kernel lacks it (then use read_maps)."""

    def __init__(self, pid: int):
        self.fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        self.q = procmap_query()
        self.name = ctypes.create_string_buffer(4096)
        self.ok = True
        try:
            self.query(0, 1 << 47)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                self.ok = False
            else:
                raise

    def query(self, lo: int, hi: int) -> list[Vma]:
        out = []
        q = self.q
        addr = lo
        while addr < hi:
            ctypes.memset(ctypes.addressof(q), 0, ctypes.sizeof(q))
            q.size = ctypes.sizeof(q)
            q.query_flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA
            q.query_addr = addr
            q.vma_name_size = len(self.name)
            q.vma_name_addr = ctypes.addressof(self.name)
            if _ioctl(self.fd, PROCMAP_QUERY, ctypes.addressof(q)) < 0:
                e = ctypes.get_errno()
                if e == errno.ENOENT:  # no VMA at or after addr
                    break
                raise OSError(e, f"PROCMAP_QUERY: {os.strerror(e)}")
            if q.vma_start >= hi:
                break
            f = q.vma_flags
            perms = (("r" if f & PROCMAP_QUERY_VMA_READABLE else "-")
                     + ("w" if f & PROCMAP_QUERY_VMA_WRITABLE else "-")
                     + ("x" if f & PROCMAP_QUERY_VMA_EXECUTABLE else "-")
                     + ("s" if f & PROCMAP_QUERY_VMA_SHARED else "p"))
            name = self.name.value.decode("utf-8", "replace") if q.vma_name_size else ""
            out.append(Vma(q.vma_start, q.vma_end, perms, q.vma_offset, q.inode, name))
            addr = q.vma_end
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def writable_pieces(
    vmas: list[Vma], ranges: list[tuple[int, int]] | None
) -> list[tuple[int, int, str]]:
    """Writable private VMAs (clipped to `ranges`) as sorted (start, end, label) pieces."""
    out = []
    rs = sorted(ranges) if ranges else None
    for v in vmas:
        if not v.writable_private or v.name in SKIP_NAMES:
            continue
        if rs is None:
            out.append((v.start, v.end, v.label))
            continue
        for lo, hi in rs:
            s, e = max(lo, v.start), min(hi, v.end)
            if s < e:
                out.append((s, e, v.label))
    out.sort()
    return out


def merge(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intervals of `a` not covered by `b` (both merged, sorted)."""
    out = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def page_count(iv: list[tuple[int, int]]) -> int:
    return sum((e - s) >> PAGE_SHIFT for s, e in iv)


def pages_of(iv: list[tuple[int, int]]):
    """All page addresses of the intervals, as a numpy uint64 array or array('Q')."""
    if np is not None:
        parts = [np.arange(s, e, PAGE, dtype=np.uint64) for s, e in iv]
        return np.concatenate(parts) if parts else np.empty(0, np.uint64)
    out = array("Q")
    for s, e in iv:
        out.extend(range(s, e, PAGE))
    return out


def expand_regions(starts, ends):
    """Page addresses of regions [starts[i], ends[i]) (bulk, numpy or array)."""
    if np is not None:
        starts = np.asarray(starts, dtype=np.uint64)
        ends = np.asarray(ends, dtype=np.uint64)
        counts = ((ends - starts) >> PAGE_SHIFT).astype(np.int64)
        total = int(counts.sum())
        if total == len(starts):
            return starts.copy()
        # page i of the output belongs to region r: start[r] + (i - first_index[r]) * PAGE
        offs = np.repeat(starts - (np.cumsum(counts) - counts).astype(np.uint64) * PAGE, counts)
        return offs + np.arange(total, dtype=np.uint64) * PAGE
    out = array("Q")
    for s, e in zip(starts, ends):
        if e - s == PAGE:
            out.append(s)
        else:
            out.extend(range(s, e, PAGE))
    return out


# --- userfaultfd on a copied fd ------------------------------------------------------------
class Uffd:
    """A userfaultfd (usually created inside the target and copied out with pidfd_getfd)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.features = 0

    def api(self, features: int = UFFD_FEATURES) -> int:
        a = uffdio_api(UFFD_API, features, 0)
        ioctl(self.fd, UFFDIO_API, a)
        self.features = a.features
        return a.features

    def register_wp(self, start: int, end: int) -> None:
        r = uffdio_register(uffdio_range(start, end - start), UFFDIO_REGISTER_MODE_WP, 0)
        ioctl(self.fd, UFFDIO_REGISTER, r)

    def unregister(self, start: int, end: int) -> None:
        ioctl(self.fd, UFFDIO_UNREGISTER, uffdio_range(start, end - start))

    def writeprotect(self, start: int, end: int, on: bool = True) -> None:
        w = uffdio_writeprotect(uffdio_range(start, end - start), UFFDIO_WRITEPROTECT_MODE_WP if on else 0)
        ioctl(self.fd, UFFDIO_WRITEPROTECT, w)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1


def local_userfaultfd(flags: int = UFFD_FLAGS) -> int:
    r = _syscall(ctypes.c_long(SYS_userfaultfd), ctypes.c_long(flags))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"userfaultfd: {os.strerror(e)}")
    return r


# --- PAGEMAP_SCAN --------------------------------------------------------------------------
class ScanEPERM(OSError):
    """PAGEMAP_SCAN with CHECK_WPASYNC hit a VMA without async uffd-wp registration.
    `.partial` holds the pages already reported (and re-protected) before the failure."""

    def __init__(self, partial, walk_end: int):
        super().__init__(errno.EPERM, "PAGEMAP_SCAN: a VMA in the range is not registered")
        self.partial = partial
        self.walk_end = walk_end


class PagemapScanner:
    """PAGEMAP_SCAN on /proc/PID/pagemap: written pages, re-protected in the same call."""

    def __init__(self, pid: int, vec_len: int = 1 << 16):
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.vec_len = vec_len
        self.vec = (ctypes.c_uint64 * (3 * vec_len))()  # zero-filled; kept zero between calls
        self.arg = pm_scan_arg()
        self.arg.size = ctypes.sizeof(pm_scan_arg)
        self.arg.vec = ctypes.addressof(self.vec)
        self.arg.vec_len = vec_len
        self.arg.category_mask = PAGE_IS_WRITTEN
        self.arg.return_mask = PAGE_IS_WRITTEN
        if np is not None:
            self.view = np.frombuffer(self.vec, dtype=np.uint64).reshape(vec_len, 3)
        else:
            self.view = memoryview(self.vec).cast("B").cast("Q")
        self.calls = 0

    def _take(self, n: int):
        """Decode (and re-zero) the first n regions of the buffer; returns (starts, ends)."""
        if np is not None:
            starts = self.view[:n, 0].copy()
            ends = self.view[:n, 1].copy()
            self.view[:n] = 0
            return starts, ends
        raw = array("Q", self.view[: 3 * n])
        ctypes.memset(self.vec, 0, 24 * n)
        return raw[0::3], raw[1::3]

    def _count_filled(self) -> int:
        if np is not None:
            nz = self.view[:, 1] == 0
            return int(nz.argmax()) if nz.any() else self.vec_len
        for i in range(self.vec_len):
            if self.view[3 * i + 1] == 0:
                return i
        return self.vec_len

    def scan(self, start: int, end: int, wp: bool = True, check: bool = True) -> list:
        """Written pages in [start, end) as a list of page-address chunks; re-protects them
        (wp=True). Raises ScanEPERM if a VMA in the range lost its registration."""
        a = self.arg
        a.flags = (PM_SCAN_WP_MATCHING if wp else 0) | (PM_SCAN_CHECK_WPASYNC if check else 0)
        a.end = end
        pos = start
        chunks = []
        while pos < end:
            a.start = pos
            a.walk_end = 0
            n = _ioctl(self.fd, PAGEMAP_SCAN, ctypes.addressof(a))
            self.calls += 1
            if n < 0:
                e = ctypes.get_errno()
                if e == errno.EPERM:
                    k = self._count_filled()
                    if k:
                        chunks.append(expand_regions(*self._take(k)))
                    raise ScanEPERM(chunks, a.walk_end)
                raise OSError(e, f"PAGEMAP_SCAN [{pos:#x}, {end:#x}): {os.strerror(e)}")
            if n:
                starts, ends = self._take(n)
                chunks.append(expand_regions(starts, ends))
                last_end = int(ends[-1])
            else:
                last_end = pos
            if n < self.vec_len:  # walk_end quirk: a short buffer means the walk finished
                break
            pos = max(int(a.walk_end), last_end)
        return chunks

    def populated(self, start: int, end: int, swapped: bool = True) -> list:
        """Pages of [start, end) that hold private data of their own: present (or, with
        `swapped`, swapped out), not a page-cache page (FILE) and not the shared zero page (a
        read fault maps that). Not the same as written: besides a write, MAP_POPULATE puts such
        pages in place, and a write to a region that may take a transparent huge page puts 512
        (see split_by_content). Changes no protection.
        Once a range is write-protected with WP_UNPOPULATED its empty entries hold uffd-wp
        markers, which PAGEMAP_SCAN reports as SWAPPED: ask with swapped=False then."""
        a = self.arg
        keep = (a.category_inverted, a.category_mask, a.category_anyof_mask, a.return_mask)
        a.category_inverted = PAGE_IS_FILE | PAGE_IS_PFNZERO
        a.category_mask = PAGE_IS_FILE | PAGE_IS_PFNZERO
        a.category_anyof_mask = PAGE_IS_PRESENT | (PAGE_IS_SWAPPED if swapped else 0)
        a.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
        try:
            return self.scan(start, end, wp=False, check=False)
        finally:
            a.category_inverted, a.category_mask, a.category_anyof_mask, a.return_mask = keep

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def union(a, b) -> array:
    """Sorted, unique array('Q') of the pages in `a` or `b`."""
    if not len(a):
        return to_array_q(b)
    if not len(b):
        return to_array_q(a)
    return to_array_q(concat([a, b]))


def difference(a, b) -> array:
    """Sorted, unique array('Q') of the pages of `a` not in `b`."""
    if not len(a) or not len(b):
        return to_array_q(a)
    if np is not None:
        d = np.setdiff1d(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
        return to_array_q(d)
    return array("Q", sorted(set(a) - set(b)))


def _runs(pages) -> list[tuple[int, int]]:
    """(first page address, page count) of each run of consecutive pages in sorted `pages`."""
    if not len(pages):
        return []
    if np is not None:
        p = np.asarray(pages, dtype=np.uint64)
        cut = (np.flatnonzero(np.diff(p) != PAGE) + 1).tolist()
        bounds = [0, *cut, len(p)]
        return [(int(p[i]), j - i) for i, j in zip(bounds, bounds[1:])]
    out: list[list[int]] = []
    for a in pages:
        if out and a == out[-1][0] + out[-1][1] * PAGE:
            out[-1][1] += 1
        else:
            out.append([a, 1])
    return [(a, n) for a, n in out]


def split_by_content(reader: VmReader, pages, chunk: int = 4 << 20) -> tuple[array, array]:
    """Split sorted, unique page addresses of the reader's process into (pages holding a nonzero
    byte, pages all zero or no longer readable), reading them with process_vm_readv.

    Why: a page of a private anonymous mapping starts zero-filled, so one that holds a nonzero
    byte has surely been written since the mapping was created; a zero-filled one may have been
    put there without any write (MAP_POPULATE, the other 511 pages of a transparent huge page)
    or written with zeros: nothing in /proc tells these apart. Reading a swapped-out page swaps
    it in; a page unmapped since it was listed counts with the zero ones."""
    nz_a, z_a = array("Q"), array("Q")  # without numpy, and unreadable pages
    nonzero, zero = [nz_a], [z_a]
    runs = _runs(pages)
    if not runs:
        return array("Q"), array("Q")
    cap = max(1, min(chunk, max(n for _, n in runs) * PAGE) // PAGE)
    buf = anon_buffer(cap * PAGE)
    addr = buffer_address(buf)
    zpage = ctypes.create_string_buffer(PAGE)
    rows = np.frombuffer(buf, dtype=np.uint64).reshape(-1, PAGE // 8) if np is not None else None
    try:
        for first, n in runs:
            off = 0
            while off < n:
                m = min(cap, n - off)
                src = first + off * PAGE
                try:
                    got = reader.read_into(addr, src, m * PAGE) // PAGE
                except OSError as e:
                    if e.errno not in (errno.EFAULT, errno.ENOMEM, errno.EIO):
                        raise
                    got = 0
                if rows is not None:
                    nz = rows[:got].any(axis=1)
                    idx = np.arange(got, dtype=np.uint64) * np.uint64(PAGE) + np.uint64(src)
                    nonzero.append(idx[nz])
                    zero.append(idx[~nz])
                else:
                    for k in range(got):
                        (nz_a if memcmp(addr + k * PAGE, zpage, PAGE) else z_a).append(src + k * PAGE)
                if got < m:  # unreadable page: no longer there
                    z_a.append(src + got * PAGE)
                    got += 1
                off += got
    finally:
        del rows
        try:
            buf.close()
        except BufferError:  # pragma: no cover - a view is still alive somewhere
            pass
    return to_array_q(concat(nonzero)), to_array_q(concat(zero))


def concat(chunks):
    """One sorted page array (numpy uint64 or array('Q')) from chunks."""
    if np is not None:
        if not chunks:
            return np.empty(0, np.uint64)
        return np.concatenate([np.asarray(c, dtype=np.uint64) for c in chunks])
    out = array("Q")
    for c in chunks:
        out.extend(c)
    return out


def to_array_q(pages) -> array:
    """Sorted, de-duplicated array('Q') from a numpy array or array('Q')."""
    if np is not None and isinstance(pages, np.ndarray):
        a = array("Q")
        a.frombytes(np.unique(pages).astype(np.uint64).tobytes())
        return a
    return array("Q", sorted(set(pages)))


# --- process_vm_readv ----------------------------------------------------------------------
_pvr = _libc.process_vm_readv
_pvr.argtypes = [
    ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.POINTER(iovec), ctypes.c_ulong,
    ctypes.c_ulong,
]
_pvr.restype = ctypes.c_ssize_t


class VmReader:
    """process_vm_readv of one remote range into a local address, reusing iovecs."""

    def __init__(self, pid: int):
        self.pid = pid
        self.liov = iovec()
        self.riov = iovec()
        self._lp = ctypes.pointer(self.liov)
        self._rp = ctypes.pointer(self.riov)

    def read_into(self, local_addr: int, remote_addr: int, n: int) -> int:
        """Read up to n bytes; returns bytes read (short at an unreadable page), raises on a
        failure at the first byte."""
        self.liov.iov_base = local_addr
        self.liov.iov_len = n
        self.riov.iov_base = remote_addr
        self.riov.iov_len = n
        r = _pvr(self.pid, self._lp, 1, self._rp, 1, 0)
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"process_vm_readv({self.pid}, {remote_addr:#x}, {n}): {os.strerror(e)}")
        return r


def anon_buffer(n: int, populate: bool = True) -> mmap.mmap:
    """A private anonymous buffer, pre-faulted (process_vm_readv into fresh pages is ~20x slower)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate and hasattr(mmap, "MAP_POPULATE"):
        flags |= mmap.MAP_POPULATE
    m = mmap.mmap(-1, max(n, PAGE), flags=flags)
    if populate and not hasattr(mmap, "MAP_POPULATE"):  # pragma: no cover
        for i in range(0, len(m), PAGE):
            m[i] = 0
    return m


def buffer_address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


# --- /proc/PID/pagemap (soft-dirty) --------------------------------------------------------
def read_pagemap(fd: int, start: int, end: int):
    """Raw 64-bit pagemap entries for [start, end) (numpy uint64 or array('Q'))."""
    n = (end - start) >> PAGE_SHIFT
    data = os.pread(fd, n * 8, (start >> PAGE_SHIFT) * 8)
    if np is not None:
        return np.frombuffer(data, dtype=np.uint64)
    a = array("Q")
    a.frombytes(data)
    return a


def soft_dirty_pages(entries, start: int):
    """Page addresses whose pagemap entry has the soft-dirty bit (55)."""
    if np is not None:
        idx = np.nonzero((entries >> np.uint64(PM_SOFT_DIRTY_BIT)) & np.uint64(1))[0]
        return np.uint64(start) + idx.astype(np.uint64) * np.uint64(PAGE)
    bit = 1 << PM_SOFT_DIRTY_BIT
    return array("Q", (start + (i << PAGE_SHIFT) for i, v in enumerate(entries) if v & bit))


def vma_flags_list(pid: int) -> list[tuple[Vma, set[str]]]:
    """(VMA, VmFlags) pairs from /proc/PID/smaps (slow: used only after a lost registration).
    VmFlags "uw" marks a userfaultfd write-protect registration."""
    out: list[tuple[Vma, set[str]]] = []
    cur: Vma | None = None
    with open(f"/proc/{pid}/smaps", "rb") as f:
        data = f.read().decode("utf-8", "replace")
    for line in data.splitlines():
        if line.startswith("VmFlags:"):
            if cur is not None:
                out.append((cur, set(line.split()[1:])))
                cur = None
            continue
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and head[0] in "0123456789abcdef" and ":" not in head:
            parts = line.split(None, 5)
            lo, hi = parts[0].split("-")
            name = parts[5].strip() if len(parts) > 5 else ""
            cur = Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), int(parts[4]), name)
    return out
