#!/usr/bin/env bash
# Builds a minimal Debian bookworm root (mmdebstrap --variant=minbase, plus man-db and
# bash-completion so the package's man page and completions can be looked up the way a user
# would) in .deps/bookworm-minbase, once per machine, and prints its path. tests/package_install.rs
# installs the .deb into a throwaway overlay on top of it, so this copy stays pristine.
#
# Idempotent: the root is built in .deps/bookworm-minbase.partial and renamed when complete, so
# an existing .deps/bookworm-minbase is always whole; concurrent callers wait on a lock.
# Needs root and mmdebstrap (scripts/install-deps.sh), and Debian's package mirror.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
deps="$here/.deps"
root="$deps/bookworm-minbase"
mirror="${VUTAP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$deps"

if [ -d "$root" ]; then echo "$root"; exit 0; fi
exec 9>"$root.lock"
flock 9
if [ -d "$root" ]; then echo "$root"; exit 0; fi

command -v mmdebstrap >/dev/null || { echo "build-debian-root.sh: needs mmdebstrap (bash scripts/install-deps.sh)" >&2; exit 1; }
partial="$root.partial"
if [ -e "$partial" ]; then
  # Left by an interrupted build. mmdebstrap mounts /dev, /proc and /sys inside the root while it
  # works: never delete through a mount that is still there.
  if grep -qF " $partial/" /proc/self/mountinfo; then
    echo "build-debian-root.sh: $partial still has mounts under it; unmount them first" >&2
    exit 1
  fi
  rm -rf --one-file-system "$partial"
fi
started=$(date +%s)
# stdin from /dev/null: without a tty mmdebstrap would read extra apt sources from it.
mmdebstrap --quiet --mode=root --variant=minbase --include=man-db,bash-completion \
  bookworm "$partial" "$mirror" </dev/null >&2
mv "$partial" "$root"
echo "build-debian-root.sh: built $root in $(($(date +%s) - started)) s ($(du -sh "$root" | cut -f1))" >&2
echo "$root"
