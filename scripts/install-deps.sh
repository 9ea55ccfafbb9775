#!/usr/bin/env bash
# Installs what vutap's tests, demo and benches need on a fresh Debian bookworm host (run as root).
# Idempotent. Both QEMU versions are unpacked side by side under .deps/ (not installed), because
# Debian's QEMU 7.2 system package conflicts with the QEMU 10 qemu-utils some hosts already carry:
#   .deps/qemu7/usr/bin/qemu-system-x86_64   (bookworm, 7.2)
#   .deps/qemu10/usr/bin/qemu-system-x86_64  (bookworm-backports, 10.0)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
deps="$here/.deps"
mkdir -p "$deps"
export DEBIAN_FRONTEND=noninteractive

bpo=/etc/apt/sources.list.d/vutap-bookworm-backports.sources
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat >"$bpo" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

# Tools (binutils: objdump and strip for scripts/build-deb.sh; linux-perf: vutap-bench --profile), the shared libraries both QEMU
# builds link against (union of their Depends), and libvirt's daemon, QEMU driver and virsh
# (bookworm's 9.0; its domains run the unpacked QEMU through an <emulator> wrapper, see
# tests/e2e_libvirt.rs). mmdebstrap (with the archive keyring and gpg it checks the mirror with)
# builds the fresh Debian root tests/package_install.rs installs the .deb into
# (scripts/build-debian-root.sh, once per machine).
pkgs=(mmdebstrap debian-archive-keyring gpg busybox-static iperf3 ethtool cpio iproute2 kmod procps dpdk dpdk-dev systemd seabios ipxe-qemu binutils linux-perf
  libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libglib2.0-0 libgmp10 libgnutls30 libhogweed6
  libibverbs1 libjpeg62-turbo libnettle8 libnuma1 libpixman-1-0 libpmem1 libpng16-16 librdmacm1
  libsasl2-2 libseccomp2 libslirp0 libudev1 liburing2 libvdeplug2 libzstd1 zlib1g
  libasound2 libbrlapi0.8 libcacard0 libcap-ng0 libepoxy0 libgbm1 libncursesw6 libsndio7.0
  libspice-server1 libtinfo6 libusb-1.0-0 libusbredirparser1
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done

fetch_qemu() { # $1 = dir name, $2 = apt release
  local dir="$deps/$1" tmp
  [ -x "$dir/usr/bin/qemu-system-x86_64" ] && return 0
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -q "qemu-system-x86/$2" "qemu-system-data/$2" "qemu-system-common/$2" >/dev/null)
  rm -rf "$dir"; mkdir -p "$dir"
  for d in "$tmp"/*.deb; do dpkg -x "$d" "$dir"; done
  rm -rf "$tmp"
}

if [ ${#missing[@]} -gt 0 ] || [ ! -x "$deps/qemu7/usr/bin/qemu-system-x86_64" ] || [ ! -x "$deps/qemu10/usr/bin/qemu-system-x86_64" ]; then
  apt-get update -q >/dev/null
fi
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# What libvirt-daemon-system would set up, without its systemd units: libvirtd runs QEMU as
# libvirt-qemu:kvm and refuses to start without them. The tests start virtlogd and libvirtd.
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd --system --gid kvm --groups libvirt-qemu \
  --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt
fetch_qemu qemu7 bookworm
fetch_qemu qemu10 bookworm-backports
for v in qemu7 qemu10; do
  printf '%s: ' "$v"; QEMU_MODULE_DIR="$deps/$v/usr/lib/x86_64-linux-gnu/qemu" "$deps/$v/usr/bin/qemu-system-x86_64" --version | head -1
done
