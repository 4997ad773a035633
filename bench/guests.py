"""What the guest-node benchmarks share: their flags, the refusal where QEMU cannot run, and
one --matrix of migrate-test cells on a lab of two fresh TCG guests that is always stopped."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from labkit.config import Settings
from labkit.experiment import run_matrix
from labkit.experiment.config import MigrateConfig
from labkit.fake import vmimage
from labkit.fake.harness import start_fake_lab


def parser(description: str, repeat: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--rate", default="1000")
    ap.add_argument("--repeat", type=int, default=repeat)
    ap.add_argument("--memory", type=int, default=1024, help="MiB per guest")
    ap.add_argument("--results", default="results")
    return ap


def cannot_run() -> bool:
    """Say why guests cannot run here (stderr), if they cannot."""
    why = vmimage.have_qemu()
    if why:
        print(f"cannot run: guest nodes need {why}", file=sys.stderr)
    return why is not None


def matrix(a: argparse.Namespace, cfg: MigrateConfig, cells: list[dict[str, Any]],
           prefix: str) -> tuple[Path, list[dict[str, Any]], float]:
    """The cells in order on one lab of two guests (the run powers them on); the matrix
    folder, its rows and the seconds it all took."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        lab = start_fake_lab(Path(tmp), count=2, kind="vm", vm={"memory": a.memory})
        try:
            folder, rows = run_matrix(lab.inventory(), Settings(results_dir=a.results), cfg,
                                      cells)
        finally:
            lab.stop()
    return folder, rows, time.monotonic() - t0
