#!/usr/bin/env bash
# scripts/rootfs.sh [CACHE_DIR]
# Builds a Debian bookworm minbase root filesystem with debootstrap into CACHE_DIR
# (default /var/cache/imafs/rootfs-bookworm-minbase) once, then prints its path.
# Idempotent: CACHE_DIR.complete marks a finished build; a build is made in
# CACHE_DIR.partial and renamed into place only when debootstrap succeeded, so an
# interrupted build is removed and redone by the next run. Concurrent runs wait on
# CACHE_DIR.lock. The mirror is the one apt is configured with (IMAFS_MIRROR overrides).
# Needs root and debootstrap. Progress goes to stderr, the path alone to stdout.
set -euo pipefail
DIR=${1:-/var/cache/imafs/rootfs-bookworm-minbase}
DIR=${DIR%/}
SUITE=${IMAFS_ROOTFS_SUITE:-bookworm}
MARKER=$DIR.complete

if [ -f "$MARKER" ] && [ -d "$DIR" ]; then
    echo "$DIR"; exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "rootfs.sh: debootstrap needs root" >&2; exit 1
fi
command -v debootstrap >/dev/null || { echo "rootfs.sh: debootstrap is not installed" >&2; exit 1; }

mirror() {
    # the site apt fetches SUITE's main component from (sources.list or deb822 .sources)
    local m
    m=$(apt-get indextargets --format '$(SITE) $(RELEASE) $(TARGET_OF)' 2>/dev/null \
        | awk -v s="$SUITE" '$2 == s && $3 == "deb" {print $1; exit}')
    [ -n "$m" ] || m=$(apt-get indextargets --format '$(SITE) $(TARGET_OF)' 2>/dev/null \
        | awk '$2 == "deb" && $1 !~ /security/ {print $1; exit}')
    echo "$m"
}

mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
# another run may have finished while we waited
if [ -f "$MARKER" ] && [ -d "$DIR" ]; then
    echo "$DIR"; exit 0
fi

MIRROR=${IMAFS_MIRROR:-$(mirror)}
[ -n "$MIRROR" ] || { echo "rootfs.sh: no Debian mirror found in the apt configuration (set IMAFS_MIRROR)" >&2; exit 1; }

remove() {
    # a killed debootstrap may leave /proc, /sys or a bind-mounted /dev mounted inside:
    # unmount them, and never let rm cross into another file system
    local d=$1 m
    [ -e "$d" ] || return 0
    for m in $(findmnt -rn -o TARGET | grep -F "$d/" | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$d"
}
trap '[ -f "$MARKER" ] || remove "$DIR.partial"' EXIT
trap 'exit 130' INT TERM
remove "$DIR.partial"; remove "$DIR"; rm -f "$MARKER"
echo "rootfs.sh: debootstrap --variant=minbase $SUITE $DIR from $MIRROR (a few minutes)" >&2
start=$(date +%s)
if ! debootstrap --variant=minbase "$SUITE" "$DIR.partial" "$MIRROR" >"$DIR.log" 2>&1; then
    tail -n 20 "$DIR.log" >&2
    echo "rootfs.sh: debootstrap failed (log: $DIR.log)" >&2
    exit 1
fi
# the apt caches are not part of the image
rm -rf "$DIR.partial"/var/cache/apt/archives/*.deb "$DIR.partial"/var/lib/apt/lists/*_Packages
mv "$DIR.partial" "$DIR"
took=$(( $(date +%s) - start ))
printf 'suite=%s mirror=%s seconds=%s date=%s\n' "$SUITE" "$MIRROR" "$took" "$(date -u +%FT%TZ)" > "$MARKER"
echo "rootfs.sh: built in ${took}s" >&2
echo "$DIR"
