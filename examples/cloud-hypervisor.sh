#!/bin/sh
# cloud-hypervisor guest on a macvtap served by vutap (vutap --socket $SOCK --tap $TAP --queues 2).
# num_queues counts virtqueues: 2 x vutap's --queues.
set -eu
SOCK=${SOCK:-/run/vutap/vm0.sock}
TAP=${TAP:-mvt0}
exec cloud-hypervisor \
  --kernel "${KERNEL:?}" --cmdline "${APPEND:-console=ttyS0}" ${DISK:+--disk path="$DISK"} \
  --cpus boot=2 --memory size=1G,shared=on \
  --net vhost_user=true,socket="$SOCK",num_queues=4,mac="$(cat /sys/class/net/"$TAP"/address)"
