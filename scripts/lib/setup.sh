# Sourced by scripts/test and scripts/demo: installs, idempotently and quietly,
# what imafs needs on a fresh Debian machine (as root), then the .venv.
# Everything it does is skipped when already done.

IMAFS_APT_PACKAGES=(fuse3 libfuse3-dev pkg-config attr ima-evm-utils fsverity
                    busybox-static stress-ng util-linux python3-gpg swtpm swtpm-tools
                    tpm2-tools debootstrap)

imafs_setup() {
    local top
    top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    local missing=()
    local p
    for p in "${IMAFS_APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing system packages: ${missing[*]}" >&2
        if [ "$(id -u)" -ne 0 ]; then
            echo "setup: need root to install packages" >&2; return 1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || return 1
    fi
    local py=${PYTHON:-python3}
    local stamp="$top/.venv/.imafs-stamp"
    local want
    want=$(cat "$top/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [ ! -x "$top/.venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "setup: preparing .venv" >&2
        [ -x "$top/.venv/bin/python" ] || "$py" -m venv "$top/.venv" || return 1
        "$top/.venv/bin/pip" install -q --disable-pip-version-check -e "$top[test,bench]" \
            >"$top/.venv/pip.log" 2>&1 || { tail -20 "$top/.venv/pip.log" >&2; return 1; }
        echo "$want" > "$stamp"
    fi
    export PATH="$top/.venv/bin:$PATH"
}
