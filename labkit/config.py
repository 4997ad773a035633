"""Behaviour knobs, layered the Invoke way: these defaults -> invoke.yaml / labkit.yaml ->
environment (INVOKE_LABKIT_* or LABKIT_* for the installed program) -> task flags.

Every network operation reads its timeout from here; nothing is hard-coded at call sites."""

from __future__ import annotations

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
        so a newer invoke.yaml does not break an older labkit."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if data is not None and f.name in data:
                default = DEFAULTS[f.name]
                value = data[f.name]
                try:
                    if isinstance(default, bool):
                        value = value if isinstance(value, bool) else str(value).lower() in (
                            "1", "true", "yes", "on")
                    elif isinstance(default, (int, float)):
                        value = type(default)(value)
                    else:
                        value = str(value)
                except (TypeError, ValueError) as e:
                    from labkit.errors import UserError

                    raise UserError(f"config labkit.{f.name}: bad value {value!r}") from e
                kwargs[f.name] = value
        return cls(**kwargs)
