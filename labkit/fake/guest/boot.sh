#!/bin/sh
# A labkit guest's boot, run once by busybox init after the switch to the overlay root.
# Settings come from the kernel command line (labkit.*), written there by labkit/fake/vm.py:
#   labkit.node=NAME labkit.user=USER labkit.lan=ADDR/PREFIX labkit.lanmac=MAC labkit.acpi=0|1
# The node's disk (/lab, survives power cycles) holds etc/ (host key, authorized_keys) and
# home/ (the user's HOME: labkit's workdir lives there).
set -u
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^labkit\.$1=//p" | tail -n 1; }
NODE=$(arg node); USER_=$(arg user); LAN=$(arg lan); LANMAC=$(arg lanmac); ACPI=$(arg acpi)
# /tmp is the host's, under the overlay (writes stay in the guest's RAM): a checkout or a
# venv the controller keeps under /tmp is then at the same path in the guest
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm /run/sshd
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
hostname "$NODE"
ip link set lo up
for dev in /sys/class/net/*; do
    name=${dev##*/}
    [ "$name" = lo ] && continue
    ip link set "$name" up
    if [ "$(cat "$dev/address")" = "$LANMAC" ]; then
        ip addr add "$LAN" dev "$name"
    else  # QEMU's user-mode NIC: the controller's way in (sshd port forwarded from the host)
        ip addr add 10.0.2.15/24 dev "$name"
        ip route add default via 10.0.2.2
    fi
done
# The user labkit logs in as: its HOME on the node's disk, a plain /bin/sh login shell (a
# host's heavy ~/.bashrc costs seconds per command under TCG).
home=/lab/home
mkdir -p "$home"
awk -F: -v u="$USER_" -v h="$home" 'BEGIN{OFS=":"} $1==u {$6=h; $7="/bin/sh"} {print}' \
    /etc/passwd >/run/passwd && cat /run/passwd >/etc/passwd
chown "$USER_" "$home" 2>/dev/null
cat >/run/sshd_config <<CFG
Port 22
HostKey /lab/etc/ssh_host_ed25519_key
AuthorizedKeysFile /lab/etc/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PidFile /run/sshd.pid
Subsystem sftp internal-sftp
CFG
if ! /usr/sbin/sshd -f /run/sshd_config -E /run/sshd.log; then
    # not "up": say why on the console and power off, so the BMC reads off and the
    # controller's wait ends with this line instead of waiting out ssh_wait
    echo "labkit-boot: $NODE: sshd failed: $(tail -n 1 /run/sshd.log 2>/dev/null)"
    busybox poweroff -f
fi
if [ "$ACPI" != 0 ]; then
    modprobe button 2>/dev/null; modprobe evdev 2>/dev/null
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\nexec /bin/busybox poweroff\n' >/etc/acpi/PWRF/00000080
    chmod +x /etc/acpi/PWRF/00000080
    busybox acpid -c /etc/acpi
fi
echo "labkit-boot: $NODE up: sshd on port 22, lab LAN $LAN"
