#!/bin/sh
# QEMU guest on a macvtap served by vutap (run vutap first:
#   vutap --socket "$SOCK" --tap "$TAP" --queues 2).
# reconnect-ms (QEMU >= 9; QEMU 7/8: reconnect=1) makes QEMU reconnect when vutap restarts,
# so vutap can be upgraded or restarted under a running guest.
# Overridable: QEMU, KERNEL, INITRD, APPEND, SOCK, TAP, MAC, QUEUES, MEM, RECONNECT, EXTRA.
set -eu
QEMU=${QEMU:-qemu-system-x86_64}
SOCK=${SOCK:-/run/vutap/vm0.sock}
TAP=${TAP:-mvt0}
MAC=${MAC:-$(cat /sys/class/net/"$TAP"/address)}
QUEUES=${QUEUES:-2}
MEM=${MEM:-1G}
RECONNECT=${RECONNECT:-reconnect-ms=1000}
VECTORS=$((2 * QUEUES + 2))
exec "$QEMU" \
  -machine q35 -smp 2 -m "$MEM" \
  -object memory-backend-memfd,id=mem,size="$MEM",share=on -numa node,memdev=mem \
  -chardev socket,id=c0,path="$SOCK","$RECONNECT" \
  -netdev vhost-user,id=n0,chardev=c0,queues="$QUEUES" \
  -device virtio-net-pci,netdev=n0,mq=on,vectors="$VECTORS",mac="$MAC" \
  ${KERNEL:+-kernel "$KERNEL"} ${INITRD:+-initrd "$INITRD"} ${APPEND:+-append "$APPEND"} \
  ${EXTRA:-}
