#!/usr/bin/env bash
# Builds the initramfs of the L1 guest that runs cloud-hypervisor nested (see
# tests/e2e_cloud_hypervisor.rs): .deps/l1/initrd.img, booted with the test guest's kernel.
# It holds busybox, iproute2's `ip`, iperf3, ethtool, the release `vutap`, cloud-hypervisor and
# its `vhost_user_net` (with their shared libraries), the kernel modules for KVM, veth, macvtap,
# tap and bridge, scripts/l1-init as /init, and the L2 guest: the test guest's kernel and its
# initramfs with scripts/ch-l2-init appended.
# Output: $VUTAP_L1_DIR, else .deps/l1. Peers: $VUTAP_PEERS_DIR, else <repo>/../shared/peers. Needs `cargo build --release -p vutap`.
# Idempotent: does nothing when the output is newer than every input.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${VUTAP_L1_DIR:-$here/.deps/l1}
peers=${VUTAP_PEERS_DIR:-$here/../shared/peers}
vutap=${VUTAP_BIN:-$here/target/release/vutap}
guest="$here/.deps/guest"
inputs=("$0" "$here/scripts/l1-init" "$here/scripts/ch-l2-init" "$vutap" "$peers/cloud-hypervisor"
  "$peers/vhost_user_net" "$guest/vmlinuz" "$guest/initrd.img")

for f in "${inputs[@]}"; do
  [ -s "$f" ] || { echo "build-l1: missing $f (peers: set VUTAP_PEERS_DIR; vutap: cargo build --release -p vutap; guest: scripts/build-guest.sh)" >&2; exit 1; }
done
up_to_date() {
  local f
  [ -s "$out/initrd.img" ] || return 1
  for f in "${inputs[@]}"; do
    [ "$out/initrd.img" -nt "$f" ] || return 1
  done
}
if up_to_date; then echo "L1 initramfs up to date: $out"; exit 0; fi
for bin in busybox iperf3 ethtool ip cpio; do
  command -v "$bin" >/dev/null || { echo "missing $bin: run scripts/install-deps.sh" >&2; exit 1; }
done
kdir="$guest/kernel"
kver=$(ls "$kdir/lib/modules" | head -1)
mkdir -p "$out"

root=$(mktemp -d)
l2extra=$(mktemp -d)
trap 'rm -rf "$root" "$l2extra"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,opt/bin,proc,sys,dev,tmp,run,etc,l2,lib/modules,lib64,lib/x86_64-linux-gnu}
cp "$(command -v busybox)" "$root/bin/busybox"
# /opt/bin comes first in L1's PATH, so iproute2's `ip` wins over busybox's (which cannot
# create a veth with a named peer); iproute2 reads its own name, so it stays `ip`.
for src in "$(command -v ip)" "$(command -v iperf3)" "$(command -v ethtool)" "$vutap" \
  "$peers/cloud-hypervisor" "$peers/vhost_user_net"; do
  cp "$src" "$root/opt/bin/"
  for lib in $(ldd "$src" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
for m in irqbypass ccp kvm kvm-amd veth macvlan tap macvtap tun llc stp bridge; do
  f=$(find "$kdir/lib/modules/$kver" -name "$m.ko*" | head -1)
  [ -n "$f" ] || { echo "build-l1: module $m not in $kdir" >&2; exit 1; }
  case "$f" in
    *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
# L2: the test guest plus its cloud-hypervisor init (booted with rdinit=/ch-l2-init); the
# kernel unpacks concatenated archives in order.
install -m 755 "$here/scripts/ch-l2-init" "$l2extra/ch-l2-init"
cp "$guest/vmlinuz" "$root/l2/vmlinuz"
{
  cat "$guest/initrd.img"
  (cd "$l2extra" && echo ch-l2-init | cpio -o -H newc --quiet | gzip -1)
} >"$root/l2/initrd.img"
install -m 755 "$here/scripts/l1-init" "$root/init"
printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "L1 initramfs built: $out/initrd.img ($(du -h "$out/initrd.img" | cut -f1))"
