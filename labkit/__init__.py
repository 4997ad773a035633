"""labkit: power, console, deploy and live-migration experiments on bare-metal lab nodes."""

__version__ = "0.1.0"
