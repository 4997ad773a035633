"""The boot image of a guest node: which kernel, and an initramfs built from the host's own
files (busybox-static, the kernel's virtio/9p/overlay modules, ``guest/init.sh`` and
``guest/boot.sh``), cached by content so a lab builds it once.

Why build it here rather than use the distro's initrd: the guest's root is the host's own
filesystem over 9p (no disk image to build or download), which no distro initrd knows how to
mount; what it takes is ~15 modules and two short scripts, written as a newc cpio in Python so
the lab needs no cpio tool. Facts behind it: ../shared/facts/vm-nodes.md."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import UserError

GUEST = Path(__file__).resolve().parent / "guest"
# What the initramfs must load before it can mount its root; dependencies are added from
# modules.dep. button/evdev (ACPI power button) are loaded later from the host's module tree.
WANTED = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay")
_BUILD = threading.Lock()  # one lab powers its guests on from several threads at once
BUSYBOX_PATHS = ("/usr/bin/busybox", "/bin/busybox", "/usr/lib/busybox/busybox-static")


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path
    modules: Path


def _vkey(version: str) -> list[tuple[int, int | str]]:
    """Version order: numbers by value, a word (rc1) before any number ("6.1.0-rc1" is older
    than "6.1.0-57"); never a str/int comparison."""
    return [(1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"[.-]", version)]


def find_kernel(kernel: str | None = None, boot: Path = Path("/boot"),
                modroot: Path = Path("/lib/modules")) -> Kernel:
    """``kernel`` (a path to a vmlinuz, or a version), else the newest /boot/vmlinuz-* that
    has its modules installed. A kernel without modules cannot mount the guest's root."""
    if kernel:
        image = Path(kernel)
        if not image.is_file():
            image = boot / f"vmlinuz-{kernel}"
        if not image.is_file():
            raise UserError(f"vm kernel {kernel!r}: no such file (nor {boot}/vmlinuz-{kernel})")
        version = image.name.removeprefix("vmlinuz-")
        if not (modroot / version / "modules.dep").is_file():
            raise UserError(f"vm kernel {image}: its modules are not in {modroot / version}")
        return Kernel(version, image, modroot / version)
    found = []
    for image in boot.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if (modroot / version / "modules.dep").is_file() and os.access(image, os.R_OK):
            found.append((_vkey(version), version, image))
    if not found:
        raise UserError("vm nodes need a Linux kernel with its modules: none readable in "
                        f"{boot} (install one: apt-get install linux-image-amd64)")
    _, version, image = max(found)
    return Kernel(version, image, modroot / version)


def find_busybox() -> Path:
    for p in BUSYBOX_PATHS:
        path = Path(p)
        if path.is_file():
            with open(path, "rb") as f:
                head = f.read(4096)
            # a dynamically linked busybox names its interpreter; the initramfs has no libc
            if b"ld-linux" not in head:
                return path
    raise UserError("vm nodes need a static busybox (apt-get install busybox-static)")


def module_order(modules: Path, wanted: tuple[str, ...] = WANTED) -> list[Path]:
    """The .ko files ``wanted`` needs, dependencies first (modules.dep lists each module's
    dependencies; insmod in any other order fails with "unknown symbol")."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    builtin = set()
    bfile = modules / "modules.builtin"
    if bfile.is_file():
        builtin = {Path(m).name.split(".ko")[0].replace("-", "_")
                   for m in bfile.read_text().split()}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise UserError(f"vm kernel modules {modules}: no module {name}")
        visit(by_name[key])
    return [modules / m for m in order]


class _Cpio:
    """A newc ("070701") archive, which is what the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.buf.write(head + name.encode() + b"\0")
        self.buf.write(b"\0" * (-(len(head) + len(name) + 1) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def node(self, name: str, major: int, minor: int) -> None:
        fields = [self.ino, stat.S_IFCHR | 0o600, 0, 0, 1, 0, 0, 0, 0, major, minor,
                  len(name) + 1, 0]
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.buf.write(head + name.encode() + b"\0")
        self.buf.write(b"\0" * (-(len(head) + len(name) + 1) % 4))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def initrd(kernel: Kernel, cache: Path) -> Path:
    """The initramfs for ``kernel``, built once into ``cache`` (named by a hash of everything
    in it, so an edit of the guest scripts or a kernel update builds a new one)."""
    busybox = find_busybox()
    mods = module_order(kernel.modules)
    parts = [busybox, GUEST / "init.sh", GUEST / "boot.sh", *mods]
    h = hashlib.sha256(kernel.version.encode())
    for p in parts:
        h.update(p.read_bytes())
    out = cache / f"initrd-{kernel.version}-{h.hexdigest()[:12]}.gz"
    with _BUILD:
        if not out.is_file():
            _build(out, busybox, mods)
    return out


def _build(out: Path, busybox: Path, mods: list[Path]) -> None:
    cache = out.parent
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules"):
        c.dir(d)
    c.node("dev/console", 5, 1)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.file("init", (GUEST / "init.sh").read_bytes(), 0o755)
    c.file("boot.sh", (GUEST / "boot.sh").read_bytes(), 0o755)
    c.file("modules.order", "".join(f"{m.name.split('.ko')[0]}\n" for m in mods).encode())
    for m in mods:
        c.file(f"modules/{m.name.split('.ko')[0]}.ko", _module_bytes(m))
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=out.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(gzip.compress(c.finish(), compresslevel=1))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)  # atomic: two labs building at once both end with a whole file
    version = out.name.split("-")[1:-1]
    for old in cache.glob(f"initrd-{'-'.join(version)}-*.gz"):
        if old != out:
            old.unlink(missing_ok=True)


def _module_bytes(path: Path) -> bytes:
    """A module as insmod takes it: Debian 13+ ships them xz- or zstd-compressed, which the
    initramfs's busybox insmod cannot read."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(data)
    if path.name.endswith((".ko.zst", ".ko.gz")):
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(data)
        raise UserError(f"vm kernel module {path} is zstd-compressed, which labkit cannot "
                        "unpack without a zstd module; use a kernel with .ko or .ko.xz modules")
    return data


def have_qemu(kernel: str | None = None) -> str | None:
    """Why guest nodes cannot run here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
    if not os.access("/usr/sbin/sshd", os.X_OK):
        return "the guest runs the host's sshd: /usr/sbin/sshd missing (apt-get install " \
               "openssh-server)"
    try:
        find_kernel(kernel)
        find_busybox()
    except UserError as e:
        return str(e)
    return None
