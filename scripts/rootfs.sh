#!/usr/bin/env bash
# scripts/rootfs.sh [CACHE_DIR]
# Builds a Debian bookworm minbase root filesystem with debootstrap into CACHE_DIR
# (default /var/cache/imafs/rootfs-bookworm-minbase) once, then prints its path.
# Idempotent: CACHE_DIR.complete marks a finished build; a build is made in
# CACHE_DIR.partial and renamed into place only when debootstrap succeeded, so an
# interrupted build is removed and redone by the next run. Concurrent runs wait on
# CACHE_DIR.lock. The mirror is the one apt is configured with (IMAFS_MIRROR overrides).
# The .debs and the archive indexes debootstrap fetched (InRelease, Release, Packages)
# are not part of the image: they are kept beside it in CACHE_DIR.archive (debs/,
# lists/), where `imafs digest-list from-dpkg CACHE_DIR --debs CACHE_DIR.archive`
# verifies them (Release signature -> Packages -> .deb). A rootfs built before the
# archive was kept gets one from `debootstrap --download-only` of the same suite (a
# package whose version has moved on since is then reported by from-dpkg).
# Needs root and debootstrap. Progress goes to stderr, the path alone to stdout.
set -euo pipefail
DIR=${1:-/var/cache/imafs/rootfs-bookworm-minbase}
DIR=${DIR%/}
SUITE=${IMAFS_ROOTFS_SUITE:-bookworm}
MARKER=$DIR.complete

ARCHIVE=$DIR.archive
if [ -f "$MARKER" ] && [ -d "$DIR" ] && [ -d "$ARCHIVE" ]; then
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
if [ -f "$MARKER" ] && [ -d "$DIR" ] && [ -d "$ARCHIVE" ]; then
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
keep_archive() {
    # keep_archive TARGET: move what debootstrap fetched into TARGET out of it, to $ARCHIVE
    local t=$1
    rm -rf "$ARCHIVE.partial"
    mkdir -p "$ARCHIVE.partial/debs" "$ARCHIVE.partial/lists"
    find "$t/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -exec mv -t "$ARCHIVE.partial/debs" {} +
    find "$t/var/lib/apt/lists" -maxdepth 1 -type f \( -name '*Release*' -o -name '*_Packages*' \) \
        -exec cp -p -t "$ARCHIVE.partial/lists" {} +
    rm -f "$t"/var/lib/apt/lists/*_Packages*
    mv "$ARCHIVE.partial" "$ARCHIVE"
}

if [ -f "$MARKER" ] && [ -d "$DIR" ]; then
    # a rootfs from before the archive was kept: fetch the same suite's packages again
    trap 'remove "$ARCHIVE.fetch"; rm -rf "$ARCHIVE.partial"' EXIT
    trap 'exit 130' INT TERM
    remove "$ARCHIVE.fetch"
    echo "rootfs.sh: debootstrap --download-only $SUITE for $ARCHIVE from $MIRROR" >&2
    if ! debootstrap --download-only --variant=minbase "$SUITE" "$ARCHIVE.fetch" "$MIRROR" \
            >"$ARCHIVE.log" 2>&1; then
        tail -n 20 "$ARCHIVE.log" >&2
        echo "rootfs.sh: fetching the archive failed (log: $ARCHIVE.log)" >&2
        exit 1
    fi
    keep_archive "$ARCHIVE.fetch"
    echo "$DIR"; exit 0
fi

trap '[ -f "$MARKER" ] || remove "$DIR.partial"; rm -rf "$ARCHIVE.partial"' EXIT
trap 'exit 130' INT TERM
remove "$DIR.partial"; remove "$DIR"; rm -f "$MARKER"; rm -rf "$ARCHIVE"
echo "rootfs.sh: debootstrap --variant=minbase $SUITE $DIR from $MIRROR (a few minutes)" >&2
start=$(date +%s)
if ! debootstrap --variant=minbase "$SUITE" "$DIR.partial" "$MIRROR" >"$DIR.log" 2>&1; then
    tail -n 20 "$DIR.log" >&2
    echo "rootfs.sh: debootstrap failed (log: $DIR.log)" >&2
    exit 1
fi
# the apt caches are not part of the image: kept beside it (from-dpkg verifies them)
keep_archive "$DIR.partial"
mv "$DIR.partial" "$DIR"
took=$(( $(date +%s) - start ))
printf 'suite=%s mirror=%s seconds=%s date=%s\n' "$SUITE" "$MIRROR" "$took" "$(date -u +%FT%TZ)" > "$MARKER"
echo "rootfs.sh: built in ${took}s" >&2
echo "$DIR"
