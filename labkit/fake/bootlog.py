"""What a fake node prints on its serial console while it boots: firmware banner, boot-device
choice, kernel lines with timestamps, systemd units, then a login prompt.

Realistic enough that console tooling (capture, expect 'login:', log files) is exercised the way
a real rack exercises it; the lines are spread over ``boot_delay`` seconds so a console reader
sees them arrive over time rather than in one burst."""

from __future__ import annotations

import random

FIRMWARE = [
    "\x1b[2J\x1b[01;01HLabKit Virtual Platform BIOS v2.19.1266 (c) 2024 LabKit",
    "CPU: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz, 32 cores",
    "Memory: 262144 MB, ECC enabled",
    "BMC firmware 1.0, IPMI 2.0 over LAN on channel 1",
    "Press <DEL> or <F2> to enter setup, <F12> for network boot",
]

KERNEL = [
    "Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) "
    "12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01)",
    "Command line: BOOT_IMAGE=/boot/vmlinuz-6.1.0-18-amd64 root=/dev/sda1 ro console=ttyS0,115200n8",
    "BIOS-provided physical RAM map:",
    "DMI: LabKit Virtual Platform/LK-2U, BIOS 2.19.1266 01/15/2024",
    "tsc: Detected 2000.000 MHz processor",
    "smpboot: Allowing 32 CPUs, 0 hotplug CPUs",
    "Memory: 263421216K/268435456K available",
    "x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'",
    "ACPI: Core revision 20220331",
    "Freeing SMP alternatives memory: 44K",
    "pci 0000:00:00.0: [8086:09a2] type 00 class 0x088000",
    "Serial: 8250/16550 driver, 4 ports, IRQ sharing enabled",
    "00:03: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A",
    "ixgbe 0000:18:00.0 eno1: NIC Link is Up 10 Gbps, Flow Control: RX/TX",
    "EXT4-fs (sda1): mounted filesystem with ordered data mode. Quota mode: none.",
    "Run /sbin/init as init process",
    "systemd[1]: systemd 252.22-1~deb12u1 running in system mode",
    "systemd[1]: Hostname set to <{name}>.",
]

SYSTEMD = [
    "[  OK  ] Created slice system-getty.slice - Slice /system/getty.",
    "[  OK  ] Started systemd-journald.service - Journal Service.",
    "[  OK  ] Finished systemd-remount-fs.service - Remount Root and Kernel File Systems.",
    "[  OK  ] Started systemd-udevd.service - Rule-based Manager for Device Events and Files.",
    "[  OK  ] Reached target network.target - Network.",
    "[  OK  ] Started ssh.service - OpenBSD Secure Shell server.",
    "[  OK  ] Started serial-getty@ttyS0.service - Serial Getty on ttyS0.",
    "[  OK  ] Reached target multi-user.target - Multi-User System.",
]


def boot_lines(name: str, bootdev: str, rng: random.Random) -> list[str]:
    """The full boot transcript (without the final login prompt), CRLF-free lines."""
    lines = list(FIRMWARE)
    if bootdev in ("pxe", "network"):
        lines += [
            ">>Start PXE over IPv4 on MAC: 52:54:00:" + ":".join(
                f"{rng.randrange(256):02x}" for _ in range(3)) + ".",
            f"  Station IP address is 10.0.0.{rng.randrange(2, 250)}",
            "PXE-E18: Server response timeout.",
            "PXE boot failed, falling back to local disk",
        ]
    elif bootdev in ("bios", "setup"):
        lines += ["Entering Setup...", "Setup: no changes, continuing boot"]
    lines.append("Booting from Hard Disk...")
    lines.append("GRUB loading.")
    lines.append("Loading Linux 6.1.0-18-amd64 ...")
    lines.append("Loading initial ramdisk ...")
    t = 0.0
    for text in KERNEL:
        lines.append(f"[{t:12.6f}] {text.format(name=name)}")
        t += rng.uniform(0.001, 0.35)
    lines.append("")
    lines.append("Welcome to \x1b[1mDebian GNU/Linux 12 (bookworm)\x1b[0m!")
    lines.append("")
    lines += SYSTEMD
    lines.append("")
    lines.append(f"Debian GNU/Linux 12 {name} ttyS0")
    lines.append("")
    return lines


def shutdown_lines(name: str) -> list[str]:
    return [
        "[  OK  ] Stopped target multi-user.target - Multi-User System.",
        "[  OK  ] Stopped ssh.service - OpenBSD Secure Shell server.",
        "[  OK  ] Reached target poweroff.target - System Power Off.",
        "reboot: Power down",
    ]


def login_prompt(name: str) -> str:
    return f"{name} login: "
