"""Programs that run ON a node for the controller, and the one way to ship them.

Each module in this folder is a complete stdlib-only program (python3 >= 3.6 on the node) that
never imports the rest of labkit: the deploy stage agent (``stage.py``), the janitor's leftover
sweep (``sweep.py``), kill-by-marker (``killmarked.py``); and one POSIX sh script, deploy's
read-only probe (``probe.sh``: a shell starts in a few ms, python3 in tens). They are ordinary
files, so ruff, the compiler and unit tests see them, and a test can run them locally as
``python3 labkit/nodeside/NAME.py ...`` or ``sh labkit/nodeside/NAME.sh ...``.

They reach a node the way the old string constants did, at the same cost: the source travels
inside the one ``exec`` request that runs it (``python3 -I -S -c SOURCE ARGS``), so there is no
upload step, nothing left on the node's disk, and no version skew between controller and node.
A program that imports a sibling (``from labkit.nodeside import killmarked``, falling back to
``import killmarked``) gets the sibling inlined ahead of its own source by ``program()``.

Only the stdlib is imported here too: the shipping helpers run on the controller, but the
fake lab and tests import the programs themselves through this package."""

from __future__ import annotations

import ast
import functools
import shlex
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# -I: ignore PYTHON* variables and the user site (a node's environment must not change what
# runs); -S: skip site.py, a third of python3's start-up.
PYTHON_FLAGS = ("-I", "-S")
# Real interpreter binaries, tried before whatever ``python3`` is on PATH when the program does
# not care which python3 runs it: a version-manager shim (pyenv) costs ~100 ms per start, more
# than these programs take to run.
FAST_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
# An exec request and its argv are bounded by the kernel's MAX_ARG_STRLEN (128 KiB per argument).
MAX_PROGRAM = 120 * 1024


# CPython before 3.11.8 (and 3.12.2) has ast.parse not thread-safe: its recursion counter is
# the interpreter's, and a finalizer that runs mid-build (a collection) can switch threads, so
# two parses at once raise "SystemError: AST constructor recursion depth mismatch" (cpython
# gh-106905). A deploy's threads ship the stage agent together, so the first program() calls
# come at once: one parse of ours at a time. The traceback module parses too (to place its
# carets), in whatever thread formats one (paramiko's transport thread, a logged exception), so
# the spurious error is also tried again after a pause (the other parse is over by then), a
# bounded number of times: the parse is pure.
_PARSE = threading.Lock()
PARSE_TRIES = 10


def _parse(name: str) -> ast.Module:
    tries = 1
    while True:
        try:
            with _PARSE:
                return ast.parse(source(name), f"{name}.py")
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or tries >= PARSE_TRIES:
                raise
        time.sleep(0.001 * tries)
        tries += 1


@functools.cache
def source(name: str) -> str:
    """The text of nodeside module ``name`` (read once per process)."""
    path = HERE / f"{name}.py"
    if not name.isidentifier() or not path.is_file():
        raise ValueError(f"no node-side program {name!r} in {HERE}")
    return path.read_text(encoding="utf-8")


def _siblings(name: str) -> list[str]:
    """Nodeside modules that ``name`` imports, by either spelling, in import order."""
    out: list[str] = []
    for node in ast.walk(_parse(name)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module == "labkit.nodeside":
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if n != name and n not in out and (HERE / f"{n}.py").is_file():
                out.append(n)
    return out


@functools.cache
def program(name: str) -> str:
    """Source for ``python3 -c``: ``name``'s siblings registered as modules, then ``name``
    itself, which runs as ``__main__``."""
    order: list[str] = []

    def visit(n: str, seen: tuple[str, ...]) -> None:
        if n in seen:
            raise ValueError(f"node-side import cycle: {' -> '.join((*seen, n))}")
        for dep in _siblings(n):
            visit(dep, (*seen, n))
        if n not in order:
            order.append(n)

    visit(name, ())
    deps = order[:-1]
    if not deps:
        text = source(name)
    else:
        head = ["import sys as _s, types as _t", "def _m(n, src):",
                "    m = _t.ModuleType(n); m.__file__ = n + '.py'; _s.modules[n] = m",
                "    exec(compile(src, n + '.py', 'exec'), m.__dict__)"]
        head += [f"_m({d!r}, {source(d)!r})" for d in deps]
        head.append("del _m, _s, _t")
        # the program's docstring is no longer its first statement: keep its __doc__ (argparse
        # help and the like read it)
        doc = ast.get_docstring(_parse(name), clean=False)
        if doc is not None:
            head.append(f"__doc__ = {doc!r}")
        text = "\n".join(head) + "\n" + source(name)
    if len(text.encode()) > MAX_PROGRAM:
        raise ValueError(f"node-side program {name} is too big to ship in one exec request")
    return text


@functools.cache
def script(name: str) -> str:
    """The text of nodeside shell script ``name`` (``NAME.sh``, read once per process)."""
    path = HERE / f"{name}.sh"
    if not name.isidentifier() or not path.is_file():
        raise ValueError(f"no node-side script {name!r} in {HERE}")
    return path.read_text(encoding="utf-8")


def shell(name: str, *args: str) -> str:
    """A command line that runs nodeside shell script ``name`` with ``args`` in the shell that
    receives it: ``set -- ARGS`` and then the script's text, so there is no second shell to
    start (the remote command already runs in one)."""
    return " ".join(["set --", *(shlex.quote(a) for a in args)]) + "\n" + script(name)


def command(name: str, *args: str, python: str = "python3", exec_: bool = True,
            fast: bool = False) -> str:
    """A shell command line that runs nodeside program ``name`` with ``args`` on a node.
    ``python`` is used as a shell word as is (it may be an expansion that picks an
    interpreter); everything else is quoted. ``fast`` picks the first of FAST_PYTHONS that
    exists instead, falling back to ``python``: for programs that do not need the python3 the
    node's user would get."""
    pick = ""
    if fast:
        pick = (f"P={python}; for p in {' '.join(shlex.quote(p) for p in FAST_PYTHONS)}; "
                'do if [ -x "$p" ]; then P=$p; break; fi; done; ')
        python = '"$P"'
    words = [*PYTHON_FLAGS, "-c", program(name), *args]
    line = " ".join([python, *(shlex.quote(w) for w in words)])
    return pick + (f"exec {line}" if exec_ else line)
