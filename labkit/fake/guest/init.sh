#!/bin/busybox sh
# PID 1 of a labkit guest's initramfs (built by labkit/fake/vmimage.py).
#
# Why an initramfs at all: the guest has no disk image. Its root is the HOST's root filesystem,
# exported read-only over 9p (tag "hostroot") with a tmpfs overlay on top, so the guest runs the
# host's python3, sshd and criu without a build step; the node's own disk is a second 9p export
# (tag "labdisk") that survives power cycles. The Debian kernel builds virtio/9p/overlay as
# modules, so they are loaded here (in modules.order, dependencies first) before the switch.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "labkit-init: $*" >/dev/console
    echo o >/proc/sysrq-trigger  # power off: the BMC then reads "off", as for a dead machine
    sleep 60
}
while read -r m; do
    insmod "/modules/$m.ko" 2>/dev/null || echo "labkit-init: insmod $m failed"
done </modules.order
mkdir -p /ro /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /ro || fail "no hostroot export"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/up /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/up,workdir=/rw/work /newroot \
    || fail "overlay mount failed"
mkdir -p /newroot/lab /newroot/etc/labkit
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=262144 labdisk /newroot/lab \
    || fail "no labdisk export"
cp /boot.sh /newroot/etc/labkit/boot.sh
# Host paths the guest must not read (the lab's key and BMC password, ~/.ssh): an empty tmpfs
# over each (labkit.hide=a,b on the kernel command line, written by labkit/fake/vm.py)
hide=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^labkit\.hide=//p' | tail -n 1)
for p in $(echo "$hide" | tr ',' ' '); do
    [ -d "/newroot$p" ] && mount -t tmpfs -o size=4k,mode=0700 hidden "/newroot$p"
done
for d in proc sys dev; do mount --move "/$d" "/newroot/$d"; done
# busybox init reaps orphans (PID 1's duty) and turns poweroff into a real ACPI power-off
cat >/newroot/etc/inittab <<'TAB'
::sysinit:/bin/sh /etc/labkit/boot.sh
ttyS0::respawn:/bin/busybox getty -n -l /bin/sh -L 115200 ttyS0 vt100
::shutdown:/bin/busybox sync
TAB
exec switch_root /newroot /bin/busybox init
