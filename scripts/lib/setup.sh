# Sourced by scripts/test and scripts/demo: installs, idempotently and quietly,
# what imafs needs on a fresh Debian machine (as root), then the .venv.
# Everything it does is skipped when already done.

# python3-venv (ensurepip, in python3.11-venv on Debian 12) and python3-pip: a
# fresh Debian 12 has neither, and python3-dev pulls in neither; acl: setfacl and
# getfacl for the ACL tests
IMAFS_APT_PACKAGES=(fuse3 libfuse3-dev pkg-config attr acl ima-evm-utils fsverity
                    busybox-static stress-ng util-linux python3-gpg swtpm swtpm-tools
                    tpm2-tools debootstrap libtss2-dev gcc python3-dev python3-venv
                    python3-pip rpm runc)

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
    if [ ! -x "$top/.venv/bin/pip" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "setup: preparing .venv" >&2
        # a .venv without pip is what "python3 -m venv" leaves when ensurepip is
        # missing (python3-venv not installed yet): make it again
        if [ ! -x "$top/.venv/bin/python" ] || [ ! -x "$top/.venv/bin/pip" ]; then
            "$py" -m venv --clear "$top/.venv" || return 1
        fi
        "$top/.venv/bin/pip" install -q --disable-pip-version-check -e "$top[test,bench]" \
            >"$top/.venv/pip.log" 2>&1 || { tail -20 "$top/.venv/pip.log" >&2; return 1; }
        echo "$want" > "$stamp"
    fi
    export PATH="$top/.venv/bin:$PATH"
    imafs_keylime_agent "$top" || return 1
}

# keylime's Python agent for tests/interop/test_keylime_services.py and the demo's
# keylime step. The agent is keylime 6.6.0 (the last release with the Python agent;
# 7.x is servers only), so it needs a venv of its own beside .venv, which holds the
# 7.x servers. Its wheel-less sdist declares no dependencies: the ones its agent
# imports are listed here. keylime's configuration templates are in neither wheel:
# they are kept from the sdists of both versions (the agent's and the servers' pin in
# pyproject.toml) in .venv-keylime-agent/share/keylime-VERSION/templates.
IMAFS_KEYLIME_AGENT_VERSION=6.6.0
IMAFS_KEYLIME_AGENT_DEPS=(cryptography psutil packaging pyyaml requests tornado lark pyasn1
                          pyasn1-modules)
imafs_keylime_agent() {
    local top=$1 venv server want stamp v tmp
    venv="$top/.venv-keylime-agent"
    server=$(grep -oE '"keylime==[0-9.]+"' "$top/pyproject.toml" | tr -dc '0-9.')
    [ -n "$server" ] || { echo "setup: no keylime==VERSION pin in pyproject.toml" >&2; return 1; }
    want="$IMAFS_KEYLIME_AGENT_VERSION $server ${IMAFS_KEYLIME_AGENT_DEPS[*]}"
    stamp="$venv/.imafs-stamp"
    [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || return 0
    echo "setup: preparing .venv-keylime-agent (keylime $IMAFS_KEYLIME_AGENT_VERSION agent)" >&2
    local py=${PYTHON:-python3}
    "$py" -m venv --clear "$venv" || return 1
    tmp=$(mktemp -d) || return 1
    if ! ( for v in "$IMAFS_KEYLIME_AGENT_VERSION" "$server"; do
               "$venv/bin/pip" download -q --disable-pip-version-check --no-deps \
                   --no-binary :all: -d "$tmp" "keylime==$v" || exit 1
           done
           "$venv/bin/pip" install -q --disable-pip-version-check \
               "$tmp/keylime-$IMAFS_KEYLIME_AGENT_VERSION.tar.gz" "${IMAFS_KEYLIME_AGENT_DEPS[@]}"
         ) >"$venv/pip.log" 2>&1; then
        tail -20 "$venv/pip.log" >&2; rm -rf "$tmp"; return 1
    fi
    mkdir -p "$venv/share"
    for v in "$IMAFS_KEYLIME_AGENT_VERSION" "$server"; do
        rm -rf "$venv/share/keylime-$v"; mkdir -p "$venv/share/keylime-$v"
        tar -xzf "$tmp/keylime-$v.tar.gz" -C "$venv/share/keylime-$v" --strip-components=1 \
            "keylime-$v/templates" || { rm -rf "$tmp"; return 1; }
    done
    echo "$IMAFS_KEYLIME_AGENT_VERSION" > "$venv/share/keylime-agent-version"
    rm -rf "$tmp"
    echo "$want" > "$stamp"
}

# The Debian rootfs of tests/mount/test_rootfs.py (scripts/rootfs.sh), built when missing.
# Rule: build it unless IMAFS_BUILD_ROOTFS=0, within IMAFS_ROOTFS_TIMEOUT seconds
# (default 300; a build took 36 s against the configured mirror on a 2-CPU test
# machine). A failed or timed-out build is not retried for a day (marker
# CACHE.failed; IMAFS_BUILD_ROOTFS=1 forces a retry) and the test then skips.
imafs_rootfs() {
    local top cache
    top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    cache=${IMAFS_ROOTFS_CACHE:-/var/cache/imafs/rootfs-bookworm-minbase}
    [ "${IMAFS_BUILD_ROOTFS:-auto}" != 0 ] || return 0
    [ -f "$cache.complete" ] && [ -d "$cache.archive" ] && return 0
    [ "$(id -u)" -eq 0 ] && command -v debootstrap >/dev/null || return 0
    if [ "${IMAFS_BUILD_ROOTFS:-auto}" != 1 ] && [ -n "$(find "$cache.failed" -mmin -1440 2>/dev/null)" ]; then
        return 0
    fi
    echo "setup: building the Debian rootfs for tests/mount/test_rootfs.py (IMAFS_BUILD_ROOTFS=0 skips)" >&2
    if timeout "${IMAFS_ROOTFS_TIMEOUT:-300}" "$top/scripts/rootfs.sh" "$cache" >/dev/null; then
        rm -f "$cache.failed"
    else
        echo "setup: rootfs build failed or timed out; tests/mount/test_rootfs.py will skip" >&2
        mkdir -p "$(dirname "$cache")" && touch "$cache.failed"
    fi
    return 0
}
