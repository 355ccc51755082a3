#!/usr/bin/env bash
# Build real Debian bookworm root filesystems with debootstrap, for tests and benchmarks.
#
# Usage: scripts/make-roots.sh [ROOT...]
#
# Roots (default: all three), built under ${TIDEDGE_ROOTS:-/var/tmp/tidedge-roots}:
#   minbase   debootstrap --variant=minbase bookworm
#   python3   minbase + python3
#   flask     minbase + python3 + python3-flask + python3-numpy
#
# A root DIR/NAME is complete only when the marker DIR/NAME.done exists. Each root is built
# in a temporary directory, renamed into place, and only then marked, so a build that was
# killed part-way is thrown away and redone on the next call. Concurrent callers are
# serialised with flock on DIR/.lock. Downloaded .debs are kept in DIR/.debcache and shared
# by all roots, so only the first build downloads the common packages.
#
# Must run as root (debootstrap creates device nodes and chroots). Progress goes to stderr;
# on success, stdout is empty.
set -euo pipefail

readonly MIRROR="http://deb.debian.org/debian"
readonly SUITE="bookworm"
readonly ALL_ROOTS=(minbase python3 flask)

log() { printf 'make-roots: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Extra packages (--include) for each root, on top of the minbase variant.
includes_for() {
    case "$1" in
        minbase) echo "" ;;
        python3) echo "python3" ;;
        flask) echo "python3,python3-flask,python3-numpy" ;;
        *) return 1 ;;
    esac
}

# Unmount anything a killed debootstrap left mounted under $1 (e.g. proc, sys), deepest
# first, so that removing the directory can never reach into a mounted filesystem.
unmount_under() {
    local dir="$1" mp
    [[ -d "$dir" ]] || return 0
    dir="$(realpath "$dir")"
    awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts \
        | sort -r \
        | while read -r mp; do
            log "unmounting leftover mount $mp"
            umount -l "$mp" || die "cannot unmount $mp"
        done
}

# Remove a partial or stale directory safely.
remove_tree() {
    local dir="$1"
    [[ -e "$dir" ]] || return 0
    unmount_under "$dir"
    rm -rf --one-file-system -- "$dir"
}

build_root() {
    local name="$1" includes target tmp marker start
    includes="$(includes_for "$name")"
    target="$ROOTS_DIR/$name"
    tmp="$ROOTS_DIR/.tmp-$name"
    marker="$ROOTS_DIR/$name.done"

    if [[ -e "$marker" && -d "$target" ]]; then
        log "$name: already built ($target)"
        return 0
    fi

    # Anything here without a marker is the remains of an interrupted build.
    rm -f -- "$marker"
    remove_tree "$tmp"
    remove_tree "$target"

    local args=(--variant=minbase "--cache-dir=$CACHE_DIR")
    [[ -n "$includes" ]] && args+=("--include=$includes")

    log "$name: debootstrap ${args[*]} $SUITE $tmp $MIRROR"
    start=$SECONDS
    # debootstrap's own progress (I: lines) goes to stderr; its stdout too.
    if ! debootstrap "${args[@]}" "$SUITE" "$tmp" "$MIRROR" 1>&2; then
        local debootstrap_log="$tmp/debootstrap/debootstrap.log"
        if [[ -f "$debootstrap_log" ]]; then
            log "$name: last lines of $debootstrap_log:"
            tail -n 30 "$debootstrap_log" >&2 || true
        fi
        unmount_under "$tmp"
        die "$name: debootstrap failed (partial tree left at $tmp, removed on the next run)"
    fi
    unmount_under "$tmp"

    # Drop apt's downloaded-package cache inside the root: it is not part of the system.
    rm -rf -- "$tmp/var/cache/apt/archives/"*.deb

    mv -T -- "$tmp" "$target"
    sync -f "$target" 2>/dev/null || true
    date -u +%Y-%m-%dT%H:%M:%SZ >"$marker"
    log "$name: done in $((SECONDS - start))s: $(du -sh --one-file-system "$target" | cut -f1), $(find "$target" -xdev | wc -l) entries"
}

main() {
    local names=("$@") name
    [[ ${#names[@]} -gt 0 ]] || names=("${ALL_ROOTS[@]}")
    for name in "${names[@]}"; do
        includes_for "$name" >/dev/null || die "unknown root '$name' (known: ${ALL_ROOTS[*]})"
    done

    [[ $EUID -eq 0 ]] || die "must run as root (debootstrap needs it)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

    ROOTS_DIR="${TIDEDGE_ROOTS:-/var/tmp/tidedge-roots}"
    mkdir -p -- "$ROOTS_DIR"
    ROOTS_DIR="$(realpath "$ROOTS_DIR")"
    CACHE_DIR="$ROOTS_DIR/.debcache"
    mkdir -p -- "$CACHE_DIR"

    # One builder at a time; the lock is released when this process exits, however it exits.
    exec 9>"$ROOTS_DIR/.lock"
    if ! flock -n 9; then
        log "another make-roots.sh is running; waiting for $ROOTS_DIR/.lock"
        flock 9
    fi

    for name in "${names[@]}"; do
        build_root "$name"
    done
}

main "$@"
