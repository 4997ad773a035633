"""migrate-test configuration: one validated dataclass, built from task flags or a matrix cell.
Every bad value is a one-line UserError (exit 2) raised before anything is started."""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from labkit.config import parse_number
from labkit.errors import UserError
from labkit.experiment.rules import StopRules

PATTERNS = ("uniform", "hotset", "sequential")
TRACKERS = ("auto", "uffd", "softdirty", "compare")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
MATRIX_KEYS = {"size", "rate", "pattern", "tracker", "hot_fraction", "seed", "steps_per_round",
               "backend", "tcp_freeze"}
BACKENDS = ("labkit", "criu")  # experiment/backends: NAMES (kept here: config imports nothing)
TCP_FREEZE = ("drop", "hold")  # what happens to the peer's packets while the workload is frozen


def parse_size(text: str | int, what: str = "--size") -> int:
    """'256M' -> bytes (K/M/G/T are binary). Whole pages, at least 2 of them."""
    if isinstance(text, int):
        value = text
    else:
        m = SIZE_RE.match(str(text))
        if not m:
            raise UserError(f"{what} {text!r}: expected a size such as 64M, 256M, 1G")
        mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
        value = int(float(m.group(1)) * mult)
    if value < 2 * 4096:
        raise UserError(f"{what} {text!r}: must be at least 8K (a header page and a data page)")
    if value % 4096:
        raise UserError(f"{what} {text!r}: must be a whole number of 4 KiB pages")
    return value


def human_size(n: int) -> str:
    for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


@dataclass
class MigrateConfig:
    src: str = "node1"
    dst: str = "node2"
    size: int = 256 << 20
    rate: float = 5000.0           # pages/s the workload dirties (timed mode)
    pattern: str = "uniform"
    hot_fraction: float = 0.1
    seed: int = 1
    tracker: str = "auto"
    rules: StopRules = field(default_factory=StopRules)
    verify_resume: int = 0         # steps both copies run after the migration (0: off)
    steps_per_round: int = 0       # >0: the workload is stepped, not timed (deterministic rounds)
    stop_and_copy: bool = True     # also measure a stop-and-copy of the frozen source
    slot: int = 0
    corrupt: str = ""              # test hook passed to the source agent (LABKIT_AGENT_CORRUPT)
    label: str = ""
    backend: str = "labkit"        # how the state moves: labkit's agents | criu
    command: str = ""              # criu: migrate this shell command (started on src) instead
    pid: int = 0                   # criu: migrate this running process (its tree) instead
    tcp: bool = False              # the workload serves a client over TCP that must stay connected
    tcp_freeze: str = "drop"       # freeze-time packets: dropped (peer retransmits) | held (NFQUEUE)
    tcp_address: str = ""          # the service address that moves ("": the lab's default)
    tcp_port: int = 7077

    @property
    def builtin(self) -> bool:
        """The built-in workload is what migrates (not a --command or --pid of the user's)."""
        return not self.command and not self.pid

    def validate(self, name: Callable[[str, Any], str] | None = None) -> MigrateConfig:
        """Check every field; ``name(key, value)`` says how the user gave it (``--rate 5``
        by default; a matrix cell names itself, ``--matrix pattern=bogus``)."""
        def what(key: str, value: Any) -> str:
            if name is not None:
                return name(key, value)
            return f"--{key.replace('_', '-')} {value!r}"

        def check(key: str, value: Any, **kw: Any) -> None:
            parse_number(value, key, shown=what(key, value), **kw)

        if not self.src or not self.dst:
            raise UserError("--src and --dst name the two nodes")
        if self.src == self.dst:
            raise UserError(f"--src and --dst are both {self.src!r}: migrate between two nodes")
        for key, value, lo in (("rate", self.rate, 0), ("seed", self.seed, None),
                               ("verify_resume", self.verify_resume, 0),
                               ("steps_per_round", self.steps_per_round, 0)):
            # typed fields set in code (a test, the demo) pass the same gate as flags
            check(key, value, integer=key != "rate", minimum=lo)
        if self.pattern not in PATTERNS:
            raise UserError(f"{what('pattern', self.pattern)}: one of {', '.join(PATTERNS)}")
        if self.tracker not in TRACKERS:
            raise UserError(f"{what('tracker', self.tracker)}: one of {', '.join(TRACKERS)}")
        check("hot_fraction", self.hot_fraction, above=0, maximum=1)
        check("max_rounds", self.rules.max_rounds, integer=True, minimum=1)
        check("min_pages", self.rules.min_pages, integer=True, minimum=0)
        check("max_growth", self.rules.max_growth, minimum=0)
        self._check_backend(what)
        self._check_tcp(what)
        if self.corrupt and not re.match(r"^(round|truncate):(\d+|final)$", self.corrupt):
            raise UserError(f"corrupt hook {self.corrupt!r}: expected round:N or truncate:N")
        return self

    def _check_backend(self, what: Callable[[str, Any], str]) -> None:
        """What each backend can migrate: labkit's agents move only the built-in workload's
        region; criu moves any process tree but runs the built-in workload timed (CRIU cannot
        carry the stdin pipe a stepped workload is driven through)."""
        if self.backend not in BACKENDS:
            raise UserError(f"{what('backend', self.backend)}: one of {', '.join(BACKENDS)}")
        if self.command and self.pid:
            raise UserError("--command and --pid: give one (start a program, or take a running "
                            "one)")
        if self.pid:
            parse_number(self.pid, "pid", shown=what("pid", self.pid), integer=True, minimum=2)
        if self.command and not self.command.strip():
            raise UserError("--command is blank: give the shell command to start on --src")
        if self.backend == "labkit":
            for key, value in (("command", self.command), ("pid", self.pid)):
                if value:
                    raise UserError(f"--{key} needs --backend criu: the labkit backend migrates "
                                    "only its own workload")
            return
        if self.tracker != "auto":
            raise UserError(f"{what('tracker', self.tracker)}: the criu backend tracks memory "
                            "with CRIU's own --track-mem (soft-dirty); --tracker is the labkit "
                            "backend's")
        if self.steps_per_round:
            raise UserError(f"{what('steps_per_round', self.steps_per_round)}: the criu "
                            "backend runs the workload timed (CRIU cannot carry the stdin "
                            "pipe a stepped workload is driven through)")
        if self.corrupt:
            raise UserError("the corrupt hook is the labkit backend's")
        if self.verify_resume and not self.builtin:
            raise UserError("--verify-resume needs the built-in workload (it runs both copies "
                            "to the same step and compares their hashes)")

    def _check_tcp(self, what: Callable[[str, Any], str]) -> None:
        """--tcp serves the built-in workload's record stream; the client checks it against
        the workload's own chain, so no other program can stand in for it."""
        if self.tcp_freeze not in TCP_FREEZE:
            raise UserError(f"{what('tcp_freeze', self.tcp_freeze)}: one of "
                            f"{', '.join(TCP_FREEZE)}")
        parse_number(self.tcp_port, "tcp_port", shown=what("tcp_port", self.tcp_port),
                     integer=True, minimum=1, maximum=65535)
        if self.tcp_address:
            try:
                addr = ipaddress.IPv4Address(self.tcp_address)
            except ValueError:
                raise UserError(f"{what('tcp_address', self.tcp_address)}: not an IPv4 "
                                "address") from None
            if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
                raise UserError(f"{what('tcp_address', self.tcp_address)}: a unicast LAN "
                                "address is needed (it moves from --src to --dst)")
        if not self.tcp:
            return
        if not self.builtin:
            raise UserError("--tcp needs the built-in workload: it serves the record stream "
                            "the client checks (not --command or --pid)")
        if self.verify_resume:
            raise UserError("--tcp and --verify-resume: the resumed source cannot serve the "
                            "connection that moved to --dst, so the two copies would differ")
        if self.steps_per_round:
            raise UserError("--tcp and --steps-per-round: a stepped workload sends records only "
                            "when stepped, so the client would see none after the move")
        if self.backend == "criu" and self.tcp_freeze == "hold":
            raise UserError("--tcp-freeze hold is the labkit backend's: CRIU's network lock "
                            "drops the packets of a frozen connection")

    @property
    def batch(self) -> int:
        return max(1, int(self.rate // 100))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["size_h"] = human_size(self.size)
        d["batch"] = self.batch
        return d

    def name(self) -> str:
        if self.label:
            return self.label
        what = (f"{human_size(self.size)}-{self.rate:g}-{self.pattern}" if self.builtin
                else f"pid{self.pid}" if self.pid else "command")
        return what if self.backend == "labkit" else f"{self.backend}-{what}"


def build_config(*, src: str, dst: str, size: str | int = "256M", rate: float | str = 5000,
                 pattern: str = "uniform", hot_fraction: float | str = 0.1, seed: int | str = 1,
                 tracker: str = "auto", max_rounds: int | str = 8, min_pages: int | str = 64,
                 max_growth: float | str = 10, verify_resume: int | str = 0,
                 steps_per_round: int | str = 0, stop_and_copy: bool = True,
                 corrupt: str = "", backend: str = "labkit", command: str = "",
                 pid: int | str | None = None, tcp: bool = False, tcp_freeze: str = "drop",
                 tcp_address: str = "", tcp_port: int | str = 7077) -> MigrateConfig:
    """From task flags (strings allowed) to a validated config. Numbers go through THE
    parser (``labkit.config.parse_number``): ``nan``, ``inf``, ``1e999``, ``0x10`` and a
    fraction where a whole number is meant are one-line errors, never a traceback later."""
    def num(value: Any, kind: type, flag: str) -> Any:
        return parse_number(value, flag, integer=kind is int)

    cfg = MigrateConfig(
        src=src, dst=dst, size=parse_size(size), rate=num(rate, float, "--rate"),
        pattern=pattern, hot_fraction=num(hot_fraction, float, "--hot-fraction"),
        seed=num(seed, int, "--seed"), tracker=tracker,
        rules=StopRules(num(max_rounds, int, "--max-rounds"), num(min_pages, int, "--min-pages"),
                        num(max_growth, float, "--max-growth")),
        verify_resume=num(verify_resume, int, "--verify-resume"),
        steps_per_round=num(steps_per_round, int, "--steps-per-round"),
        stop_and_copy=stop_and_copy, corrupt=corrupt, backend=backend, command=command or "",
        pid=0 if pid in (None, "") else parse_number(pid, "--pid", integer=True, minimum=2),
        tcp=tcp, tcp_freeze=tcp_freeze, tcp_address=tcp_address or "",
        tcp_port=num(tcp_port, int, "--tcp-port"))
    return cfg.validate()


def parse_matrix(spec: str) -> list[dict[str, Any]]:
    """'size=64M,256M rate=1000,20000 pattern=uniform,hotset' -> the grid's cells (dicts of
    overrides), in a stable order (first key varies slowest)."""
    axes: list[tuple[str, list[str]]] = []
    for item in re.split(r"[\s;]+", spec.strip()):
        if not item:
            continue
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise UserError(f"--matrix item {item!r}: expected key=v1,v2")
        if key not in MATRIX_KEYS:
            raise UserError(f"--matrix key {key!r}: one of {', '.join(sorted(MATRIX_KEYS))}")
        if any(k == key for k, _ in axes):
            raise UserError(f"--matrix key {key!r} given twice")
        cells = [v for v in values.split(",") if v.strip()]
        if not cells:  # `rate=,` would be a grid of no runs at all
            raise UserError(f"--matrix item {item!r}: no values")
        axes.append((key, cells))
    if not axes:
        raise UserError("--matrix is empty")
    return [dict(zip([k for k, _ in axes], combo))
            for combo in itertools.product(*[v for _, v in axes])]


def apply_cell(base: MigrateConfig, cell: dict[str, Any]) -> MigrateConfig:
    """``base`` with one matrix cell's values; an error names the cell as the user wrote it
    (``--matrix pattern=bogus``), not a flag they never gave."""
    def name(key: str, value: Any) -> str:
        return f"--matrix {key}={cell.get(key, value)}"

    changes: dict[str, Any] = {}
    for k, v in cell.items():
        if k == "size":
            changes[k] = parse_size(v, "--matrix size")
        elif k in ("rate", "hot_fraction"):
            changes[k] = parse_number(v, k, shown=name(k, v))
        elif k in ("seed", "steps_per_round"):
            changes[k] = parse_number(v, k, shown=name(k, v), integer=True)
        else:
            changes[k] = v
    label = "-".join(f"{k}={v}" for k, v in cell.items())
    return replace(base, label=label, **changes).validate(
        lambda k, v: name(k, v) if k in cell else f"--{k.replace('_', '-')} {v!r}")
