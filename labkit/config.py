"""Behaviour knobs, layered the Invoke way: these defaults -> invoke.yaml / labkit.yaml ->
environment (INVOKE_LABKIT_* or LABKIT_* for the installed program) -> task flags.

Every network operation reads its timeout from here; nothing is hard-coded at call sites."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

DEFAULTS: dict[str, Any] = {
    "parallel": 32,            # fan-out pool size
    "retry_window": 60.0,      # seconds a retryable BMC error is retried for (Ironic's default)
    "retry_first_delay": 0.5,
    "retry_max_delay": 5.0,
    "min_interval": 0.0,       # seconds between commands to one BMC (real hardware wants ~5)
    "bmc_timeout": 10.0,       # one IPMI command's budget before it counts as a timeout
    "power_wait": 120.0,       # budget for --wait to reach the target power state
    "ssh_wait": 180.0,         # budget for --wait ssh after the BMC reports on
    "cycle_delay": 2.0,        # off -> on delay for power-cycle (labgrid's default)
    "ssh_timeout": 10.0,       # connect / auth / banner timeout
    "command_timeout": 600.0,  # default remote command timeout for `run`
    "trust_on_first_use": False,
    "results_dir": "results",
    "lease_dir": "",           # empty: per-user state folder (~/.local/state/labkit/leases)
    "progress": "auto",        # auto | always | never
    "research_tree": "",       # default --repo for `sync`
    # read by labkit.deploy straight from the config (None = unset; listed here so that
    # INVOKE_LABKIT_PAYLOADS / INVOKE_LABKIT_DEPLOY_BUILD reach them from the environment)
    "payloads": None,          # list of paths to deploy (default: inventory payloads:, else labkit's own)
    "deploy_build": None,      # build command run in a new release (None: python compile check)
}


def config_layer() -> dict[str, Any]:
    """The ``labkit:`` defaults as handed to Invoke: numbers and booleans as None. Invoke
    casts an environment variable to the type of the value it overrides, itself and before
    any labkit code runs: ``INVOKE_LABKIT_PARALLEL=nan`` was a ValueError traceback and
    ``..._TRUST_ON_FIRST_USE=maybe`` silently True. Given None, Invoke keeps the text and
    :meth:`Settings.from_mapping` parses it like any flag (None there is the default)."""
    return {k: None if isinstance(v, (bool, int, float)) else v for k, v in DEFAULTS.items()}


@dataclass
class Settings:
    parallel: int = DEFAULTS["parallel"]
    retry_window: float = DEFAULTS["retry_window"]
    retry_first_delay: float = DEFAULTS["retry_first_delay"]
    retry_max_delay: float = DEFAULTS["retry_max_delay"]
    min_interval: float = DEFAULTS["min_interval"]
    bmc_timeout: float = DEFAULTS["bmc_timeout"]
    power_wait: float = DEFAULTS["power_wait"]
    ssh_wait: float = DEFAULTS["ssh_wait"]
    cycle_delay: float = DEFAULTS["cycle_delay"]
    ssh_timeout: float = DEFAULTS["ssh_timeout"]
    command_timeout: float = DEFAULTS["command_timeout"]
    trust_on_first_use: bool = DEFAULTS["trust_on_first_use"]
    results_dir: str = DEFAULTS["results_dir"]
    lease_dir: str = DEFAULTS["lease_dir"]
    progress: str = DEFAULTS["progress"]
    research_tree: str = DEFAULTS["research_tree"]

    @classmethod
    def from_mapping(cls, data: Any) -> Settings:
        """Build from Invoke's ``ctx.config.labkit`` (or any mapping); unknown keys are ignored
        so a newer invoke.yaml does not break an older labkit. Every value is checked like a
        task flag (:func:`parse_number`, :func:`parse_bool`): a config file's ``parallel: nan``
        or ``results_dir: 0123`` (YAML's octal 83) is a one-line error, not a surprise."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if data is None or f.name not in data or data[f.name] is None:
                continue
            default, value = DEFAULTS[f.name], data[f.name]
            what = f"config labkit.{f.name}"
            if isinstance(default, bool):
                value = parse_bool(value, what)
            elif isinstance(default, int):
                value = parse_number(value, what, integer=True, minimum=1)
            elif isinstance(default, float):
                value = parse_number(value, what, minimum=0.0,
                                     above=0.0 if f.name in _POSITIVE else None)
            else:
                if not isinstance(value, str):
                    from labkit.errors import UserError

                    raise UserError(f"{what}: {value!r} is not text (YAML read it as "
                                    f"{type(value).__name__}); quote it")
                if f.name in _CHOICES and value not in _CHOICES[f.name]:
                    from labkit.errors import UserError

                    raise UserError(f"{what} {value!r}: one of {', '.join(_CHOICES[f.name])}")
            kwargs[f.name] = value
        return cls(**kwargs)


# Settings that must be > 0 (a zero timeout or budget fails everything at once); the other
# numbers may be 0 (no retry, no interval, no delay).
_POSITIVE = {"bmc_timeout", "power_wait", "ssh_wait", "ssh_timeout", "command_timeout"}
_CHOICES = {"progress": ("auto", "always", "never")}

_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_FLOAT_RE = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_number(value: Any, what: str, *, integer: bool = False, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None,
                 shown: str | None = None) -> Any:
    """THE parser of a number the user gave (a task flag, a matrix cell, a config value):
    plain decimal only, finite, in range, or a one-line ``UserError`` naming ``what`` and the
    value. ``nan``, ``inf``, ``1e999`` (which float() reads as inf), ``0x10`` and, where a
    whole number is meant, ``1.5`` are refused rather than converted: each of them once
    reached a traceback or a silently wrong run. ``minimum`` is inclusive, ``above``
    exclusive. ``shown``: how to name the value in an error when ``what value`` is not how
    the user wrote it (a matrix cell is ``--matrix rate=nan``). Returns an int when
    ``integer``, else a float."""
    from labkit.errors import UserError

    shown = shown or f"{what} {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{shown}: expected {'a whole number' if integer else 'a number'}")
    if isinstance(value, str):
        text = value.strip()
        if integer:
            if not _INT_RE.match(text):
                hint = " (no fraction, exponent or 0x)" if _FLOAT_RE.match(text) or \
                    text.lower().startswith(("0x", "-0x", "+0x")) else ""
                raise UserError(f"{shown}: expected a whole number{hint}")
            number: float = int(text)
        else:
            if not _FLOAT_RE.match(text):
                raise UserError(f"{shown}: expected a number")
            number = float(text)
    elif integer and not isinstance(value, int):
        raise UserError(f"{shown}: expected a whole number")
    else:
        number = value
    if not math.isfinite(number):
        raise UserError(f"{shown}: expected a finite number")
    if minimum is not None and number < minimum:
        raise UserError(f"{shown}: must be >= {minimum:g}")
    if above is not None and not number > above:
        raise UserError(f"{shown}: must be > {above:g}")
    if maximum is not None and number > maximum:
        raise UserError(f"{shown}: must be <= {maximum:g}")
    return int(number) if integer else float(number)


def parse_bool(value: Any, what: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (an environment variable is text); anything else is
    refused, not read as False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    from labkit.errors import UserError

    raise UserError(f"{what} {value!r}: expected true or false")
