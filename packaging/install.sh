#!/usr/bin/env bash
# Install the SmartCorr gateway as a system service, or upgrade it (docs/installing.md).
# Run it from a checkout, as root or through sudo; every run may be repeated and changes
# only what differs. `packaging/install.sh --help` says what it does.
set -euo pipefail
umask 022

usage() {
    cat <<'EOF'
usage: packaging/install.sh [ACTION] [OPTIONS]

Install the SmartCorr gateway from this checkout as the systemd service
smartcorr-gateway: the system user `smartcorr` (groups dialout, and tss/gpio where they
exist), /etc/smartcorr (0750 root:smartcorr), /etc/smartcorr/identity and
/var/lib/smartcorr (0700 smartcorr), the code in /opt/smartcorr/releases/<version> with
its virtual env, /opt/smartcorr/current pointing at it, the unit, the udev rule made
from /etc/smartcorr/devices.conf, the polkit rule for the UPS power-off, and
/usr/local/bin/smartcorr (the command line as the smartcorr user). It never touches
gateway.toml's contents, the identity's contents or the record store. Running it again
changes nothing that is right already.

Actions (one at most; none: install, keeping the installed code if there is some):
  --upgrade          install this checkout's code as a new release, switch to it and
                     restart the service if it runs (configuration, identity and data
                     are kept); if it does not come back, the previous release is put
                     back. Nothing happens when the code is the installed one.
  --rollback         switch back to the previous release and restart the service.
  --fix-ownership    only hand the identity's files to the smartcorr user (files made by
                     `provision` run as root; modes are kept, 0600 stays 0600) and give
                     gateway.toml to root:smartcorr 0640.

Options:
  --root DIR         install into the directory tree DIR instead of / (tests, images):
                     users and files are made there, and systemctl and udevadm are not
                     called.
  --dry-run          print what would change, change nothing.
  --no-venv          copy the code without making its virtual env (tests; an image
                     builder that makes it elsewhere). The service cannot start until
                     <release>/.venv/bin/python exists.
  --allow-net LIST   only these IP networks for the service (comma-separated, e.g.
                     203.0.113.0/24,2001:db8::/32, the broker's and the DNS server's
                     unless that is local): a drop-in with IPAddressDeny=any; `any`
                     removes the drop-in (docs/hardening.md).
  -h, --help         this text.

Exit status: 0 done (or nothing to do), 1 a step failed (the message says which), 2 a
usage error.
EOF
}

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
usage_error() { say "$*"; say "see packaging/install.sh --help"; exit 2; }

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKG="$SRC/packaging"
ROOT=""
action=install
dry_run=0
no_venv=0
allow_net=""
set_allow_net=0
orig_args=("$@")

while [ $# -gt 0 ]; do
    case "$1" in
        --upgrade|--rollback|--fix-ownership)
            [ "$action" = install ] || usage_error "$1 and --$action: one action at a time"
            action="${1#--}" ;;
        --root)
            [ $# -ge 2 ] || usage_error "--root needs a directory"
            ROOT="$2"; shift ;;
        --root=*) ROOT="${1#--root=}" ;;
        --dry-run) dry_run=1 ;;
        --no-venv) no_venv=1 ;;
        --allow-net)
            [ $# -ge 2 ] || usage_error "--allow-net needs a list of networks, or any"
            allow_net="$2"; set_allow_net=1; shift ;;
        --allow-net=*) allow_net="${1#--allow-net=}"; set_allow_net=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
    shift
done

if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || usage_error "--root $ROOT: no such directory (make it first)"
    ROOT="$(cd "$ROOT" && pwd)"
    [ "$ROOT" != / ] || ROOT=""
fi
live=1  # acting on the running system: systemctl, udevadm
[ -z "$ROOT" ] || live=0

if [ "$(id -u)" -ne 0 ] && [ "$live" -eq 1 ] && [ "$dry_run" -eq 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        say "not root: running again with sudo"
        exec sudo -- "$0" "${orig_args[@]}"
    fi
    usage_error "run it as root (it makes a system user and writes /etc, /opt)"
fi
as_root=0
[ "$(id -u)" -ne 0 ] || as_root=1

[ -f "$SRC/gateway.py" ] && [ -f "$SRC/pyproject.toml" ] \
    || die "$SRC is not a SmartCorr checkout (no gateway.py or pyproject.toml)"

if [ "$set_allow_net" -eq 1 ] && [ "$allow_net" != any ]; then
    IFS=',' read -r -a nets <<<"$allow_net"
    [ "${#nets[@]}" -gt 0 ] || usage_error "--allow-net: give networks (a.b.c.d/n, ...) or any"
    for net in "${nets[@]}"; do
        [[ "$net" =~ ^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$ ]] \
            || usage_error "--allow-net: '$net' is not an IP address or network (a.b.c.d/n, x:y::/n)"
    done
fi

UNIT=smartcorr-gateway.service
USER_NAME=smartcorr
OPT="$ROOT/opt/smartcorr"
ETC="$ROOT/etc/smartcorr"
IDENTITY="$ETC/identity"
DATA="$ROOT/var/lib/smartcorr"
UNIT_PATH="$ROOT/etc/systemd/system/$UNIT"
DROPIN="$ROOT/etc/systemd/system/$UNIT.d/50-allow-net.conf"
SYSUSERS="$ROOT/etc/sysusers.d/smartcorr.conf"
SYSUSERS_GROUPS="$ROOT/etc/sysusers.d/smartcorr-groups.conf"
TMPFILES="$ROOT/etc/tmpfiles.d/smartcorr.conf"
UDEV_RULES="$ROOT/etc/udev/rules.d/70-smartcorr.rules"
POLKIT_DIR="$ROOT/etc/polkit-1/rules.d"
WRAPPER="$ROOT/usr/local/bin/smartcorr"
KEEP_RELEASES=2  # the current one and the previous one (--rollback)

changed=0
# shellcheck disable=SC2317  # called indirectly
run() {  # a command that changes something
    changed=1
    if [ "$dry_run" -eq 1 ]; then say "would run: $*"; return 0; fi
    "$@"
}

# put SRC_FILE DEST MODE [OWNER:GROUP]: install a file when its content, mode or owner
# differs (so that a second run touches nothing)
put() {
    local src="$1" dest="$2" mode="$3" owner="${4:-0:0}" same=1
    if [ ! -f "$dest" ] || ! cmp -s "$src" "$dest"; then same=0
    elif [ "$(stat -c %a "$dest")" != "${mode#0}" ]; then same=0
    elif [ "$as_root" -eq 1 ] && [ "$(stat -c %u:%g "$dest")" != "$owner" ]; then same=0
    fi
    [ "$same" -eq 0 ] || return 0
    changed=1
    if [ "$dry_run" -eq 1 ]; then say "would write $dest (mode $mode)"; return 0; fi
    mkdir -p "$(dirname "$dest")"
    local tmp
    tmp="$(mktemp "$(dirname "$dest")/.install.XXXXXX")"
    cat "$src" >"$tmp"
    chmod "$mode" "$tmp"
    [ "$as_root" -eq 0 ] || chown "$owner" "$tmp"
    mv -f "$tmp" "$dest"
    say "wrote $dest"
}

put_text() {  # put_text TEXT DEST MODE: as put, from a string
    local tmp
    tmp="$(mktemp)"
    printf '%s' "$1" >"$tmp"
    put "$tmp" "$2" "$3" "${4:-0:0}"
    rm -f "$tmp"
}

remove() {
    [ -e "$1" ] || return 0
    changed=1
    if [ "$dry_run" -eq 1 ]; then say "would remove $1"; return 0; fi
    rm -f "$1"
    say "removed $1"
}

# -- the user and its groups --------------------------------------------------------------
group_exists() { grep -q "^$1:" "$ROOT/etc/group" 2>/dev/null; }
uid_of() { awk -F: -v u="$1" '$1 == u { print $3 }' "$ROOT/etc/passwd" 2>/dev/null; }
gid_of() { awk -F: -v g="$1" '$1 == g { print $3 }' "$ROOT/etc/group" 2>/dev/null; }
member_of() {  # member_of GROUP: the smartcorr user is listed in GROUP
    awk -F: -v g="$1" -v u="$USER_NAME" '$1 == g { n = split($4, m, ","); \
        for (i = 1; i <= n; i++) if (m[i] == u) found = 1 } END { exit !found }' \
        "$ROOT/etc/group" 2>/dev/null
}

add_user_by_hand() {  # as systemd-sysusers would, in a tree the caller owns
    local id=999 g
    while grep -q "^[^:]*:[^:]*:$id:" "$ROOT/etc/passwd" "$ROOT/etc/group" 2>/dev/null; do
        id=$((id - 1))
    done
    if [ -z "$(gid_of "$USER_NAME")" ]; then
        printf '%s:x:%s:\n' "$USER_NAME" "$id" >>"$ROOT/etc/group"
        [ ! -f "$ROOT/etc/gshadow" ] || printf '%s:!*::\n' "$USER_NAME" >>"$ROOT/etc/gshadow"
    fi
    if [ -z "$(uid_of "$USER_NAME")" ]; then
        printf '%s:x:%s:%s:SmartCorr edge gateway:/var/lib/smartcorr:/usr/sbin/nologin\n' \
            "$USER_NAME" "$id" "$(gid_of "$USER_NAME")" >>"$ROOT/etc/passwd"
        [ ! -f "$ROOT/etc/shadow" ] || printf '%s:!*:::::::\n' "$USER_NAME" >>"$ROOT/etc/shadow"
    fi
    for g in dialout tss gpio; do
        if group_exists "$g" && ! member_of "$g"; then
            awk -F: -v OFS=: -v g="$g" -v u="$USER_NAME" \
                '$1 == g { $4 = ($4 == "" ? u : $4 "," u) } { print }' \
                "$ROOT/etc/group" >"$ROOT/etc/group.new"
            mv "$ROOT/etc/group.new" "$ROOT/etc/group"
        fi
    done
}

ensure_user() {
    local groups_conf="# Made by packaging/install.sh: the device groups present on this system.
" g
    for g in tss gpio; do
        if group_exists "$g"; then groups_conf+="m $USER_NAME $g
"; fi
    done
    put "$PKG/smartcorr.sysusers" "$SYSUSERS" 0644
    put_text "$groups_conf" "$SYSUSERS_GROUPS" 0644
    local before
    before="$(grep "^$USER_NAME:\|[:,]$USER_NAME\(,\|$\)" "$ROOT/etc/passwd" "$ROOT/etc/group" \
              2>/dev/null || true)"
    local complete=1
    [ -n "$(uid_of "$USER_NAME")" ] || complete=0
    for g in dialout tss gpio; do
        if group_exists "$g" && ! member_of "$g"; then complete=0; fi
    done
    if [ "$complete" -eq 1 ]; then
        :  # sysusers would find nothing to do, but still rewrite /etc's lock and backups
    elif [ "$as_root" -eq 0 ]; then
        # a --root tree as a user (tests): the tools want to chown, so edit the files
        if [ "$dry_run" -eq 1 ]; then say "would add the user $USER_NAME to $ROOT/etc"
        else add_user_by_hand; fi
    elif command -v systemd-sysusers >/dev/null 2>&1; then
        if [ "$dry_run" -eq 1 ]; then
            run systemd-sysusers ${ROOT:+--root="$ROOT"} "$SYSUSERS" "$SYSUSERS_GROUPS"
        else
            systemd-sysusers ${ROOT:+--root="$ROOT"} "$SYSUSERS" "$SYSUSERS_GROUPS"
        fi
    else  # no systemd-sysusers: the shadow tools
        if [ -z "$(uid_of "$USER_NAME")" ]; then
            run useradd ${ROOT:+--root "$ROOT"} --system --user-group \
                --home-dir /var/lib/smartcorr --no-create-home \
                --shell /usr/sbin/nologin --comment "SmartCorr edge gateway" "$USER_NAME"
        fi
        for g in dialout tss gpio; do
            if group_exists "$g" && ! member_of "$g"; then
                run usermod ${ROOT:+--root "$ROOT"} -a -G "$g" "$USER_NAME"
            fi
        done
    fi
    local after
    after="$(grep "^$USER_NAME:\|[:,]$USER_NAME\(,\|$\)" "$ROOT/etc/passwd" "$ROOT/etc/group" \
             2>/dev/null || true)"
    if [ "$before" != "$after" ]; then
        changed=1
        say "user $USER_NAME: $(grep "[:,]$USER_NAME\(,\|$\)" "$ROOT/etc/group" | cut -d: -f1 \
            | paste -sd, -) (uid $(uid_of "$USER_NAME"))"
    fi
}

# -- directories and ownership ------------------------------------------------------------
# Z in the tmpfiles file hands the identity to the smartcorr user; the tmpfiles call
# reports nothing, so count what it is about to change.
foreign_identity_files() {
    local uid
    uid="$(uid_of "$USER_NAME")"
    [ -n "$uid" ] && [ -d "$IDENTITY" ] || return 0
    find "$IDENTITY" \( ! -uid "$uid" -o ! -gid "$(gid_of "$USER_NAME")" \) -print \
        2>/dev/null || true
}

ensure_dirs() {
    put "$PKG/smartcorr.tmpfiles" "$TMPFILES" 0644
    local foreign dirs_before dirs_after toml_before toml_after
    foreign=0  # owners can be changed by root only (a --root tree as a user: modes only)
    [ "$as_root" -eq 0 ] || foreign="$(foreign_identity_files | wc -l)"
    dirs_before="$(stat -c '%n %a %u %g' "$ETC" "$IDENTITY" "$DATA" 2>/dev/null || true)"
    toml_before="$(stat -c '%a %u %g' "$ETC/gateway.toml" 2>/dev/null || true)"
    if [ "$dry_run" -eq 1 ]; then
        [ "$foreign" -eq 0 ] || say "would give $foreign file(s) under $IDENTITY to $USER_NAME"
        [ -d "$ETC" ] && [ -d "$IDENTITY" ] && [ -d "$DATA" ] \
            || say "would make $ETC, $IDENTITY, $DATA"
        return 0
    fi
    if [ "$as_root" -eq 1 ] && command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles ${ROOT:+--root="$ROOT"} --create "$TMPFILES"
    else  # no systemd-tmpfiles, or not root (a --root test as a user): modes only
        local uid gid
        uid="$(uid_of "$USER_NAME")"; gid="$(gid_of "$USER_NAME")"
        mkdir -p "$ETC" "$IDENTITY" "$DATA"
        chmod 0750 "$ETC"; chmod 0700 "$IDENTITY" "$DATA"
        [ ! -f "$ETC/gateway.toml" ] || chmod 0640 "$ETC/gateway.toml"
        if [ "$as_root" -eq 1 ]; then
            chown "0:$gid" "$ETC"; chown "$uid:$gid" "$DATA"
            chown -R -h "$uid:$gid" "$IDENTITY"
            [ ! -f "$ETC/gateway.toml" ] || chown "0:$gid" "$ETC/gateway.toml"
        fi
    fi
    [ "$foreign" -eq 0 ] || say "gave $foreign file(s) under $IDENTITY to $USER_NAME (modes kept)"
    dirs_after="$(stat -c '%n %a %u %g' "$ETC" "$IDENTITY" "$DATA" 2>/dev/null || true)"
    toml_after="$(stat -c '%a %u %g' "$ETC/gateway.toml" 2>/dev/null || true)"
    [ "$dirs_before" = "$dirs_after" ] \
        || say "directories: $ETC 0750 root:$USER_NAME, $IDENTITY and $DATA 0700 $USER_NAME"
    [ "$toml_before" = "$toml_after" ] \
        || say "$ETC/gateway.toml: 0640 root:$USER_NAME (was mode ${toml_before%% *})"
    if [ "$foreign" -ne 0 ] || [ "$dirs_before" != "$dirs_after" ] || \
            [ "$toml_before" != "$toml_after" ]; then
        changed=1
    fi
}

# -- the code -----------------------------------------------------------------------------
source_files() {  # NUL-separated paths relative to $SRC: the checkout's files
    if [ -d "$SRC/.git" ] && command -v git >/dev/null 2>&1; then
        # safe.directory: a clone made by another user (pi) and installed with sudo
        local list
        list="$(mktemp)"
        git -c safe.directory="$SRC" -C "$SRC" ls-files -z --cached --others \
            --exclude-standard >"$list" || { rm -f "$list"; die "git ls-files failed in $SRC"; }
        while IFS= read -r -d '' f; do
            if [ -f "$SRC/$f" ]; then printf '%s\0' "$f"; fi
        done <"$list"
        rm -f "$list"
    else
        (cd "$SRC" && find . \( -name .git -o -name .venv -o -name __pycache__ \
            -o -name '*.egg-info' -o -name '.*_cache' -o -name .hypothesis \) -prune \
            -o -type f -print0 | sed -z 's|^\./||')
    fi | grep -zv '^SHA256SUMS$' | sort -z
}

manifest() {  # the sha256sum lines of the checkout's files
    (cd "$SRC" && source_files | xargs -0 -r sha256sum --)
}

release_version() {
    sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$SRC/pyproject.toml" | head -n 1
}

switch_link() {  # switch_link NAME TARGET: point $OPT/NAME at releases/TARGET atomically
    local link="$OPT/$1" target="releases/$2"
    [ "$(readlink "$link" 2>/dev/null || true)" != "$target" ] || return 0
    changed=1
    if [ "$dry_run" -eq 1 ]; then say "would point $link at $target"; return 0; fi
    ln -sfn "$target" "$OPT/.$1.new"
    mv -Tf "$OPT/.$1.new" "$link"
    say "$link -> $target"
}

release_of() {  # release_of current|previous: the release id the link points at, or nothing
    local target
    target="$(readlink "$OPT/$1" 2>/dev/null)" || return 0
    printf '%s\n' "${target#releases/}"
}

build_release() {  # build_release ID MANIFEST_FILE: copy the checkout, make its venv
    local id="$1" sums="$2" rel="$OPT/releases/$1"
    changed=1
    if [ "$dry_run" -eq 1 ]; then
        say "would copy $SRC to $rel$( [ "$no_venv" -eq 1 ] || printf ' and make its virtual env')"
        return 0
    fi
    rm -rf "$rel"  # an earlier attempt that did not finish (no SHA256SUMS)
    mkdir -p "$rel"
    (cd "$SRC" && source_files | tar --null -T - -cf -) | tar -xf - -C "$rel" --no-same-owner
    if ! (cd "$rel" && sha256sum --quiet --strict -c "$sums" >/dev/null 2>&1); then
        rm -rf "$rel"
        die "the copy in $rel differs from $SRC's files (did the checkout change meanwhile?): nothing was switched"
    fi
    say "copied $(wc -l <"$sums") files to $rel"
    if [ "$no_venv" -eq 0 ]; then
        say "making the virtual env of $rel (scripts/setup.sh --service)"
        if ! bash "$rel/scripts/setup.sh" --service; then
            rm -rf "$rel"
            die "the virtual env of the new release could not be made (above): nothing was switched"
        fi
        if ! "$rel/.venv/bin/python" "$rel/gateway.py" --help >/dev/null; then
            rm -rf "$rel"
            die "the new release does not start ($rel/gateway.py --help failed): nothing was switched"
        fi
    fi
    [ "$as_root" -eq 0 ] || chown -R -h 0:0 "$rel"
    chmod -R go-w "$rel"
    # written last: a release directory without it is unfinished
    cp "$sums" "$rel/SHA256SUMS"
    chmod 0644 "$rel/SHA256SUMS"
}

prune_releases() {
    local keep_cur keep_prev d
    keep_cur="$(release_of current)"; keep_prev="$(release_of previous)"
    [ -d "$OPT/releases" ] || return 0
    for d in "$OPT/releases"/*; do
        [ -d "$d" ] || continue
        case "$(basename "$d")" in "$keep_cur"|"$keep_prev") continue ;; esac
        changed=1
        if [ "$dry_run" -eq 1 ]; then say "would remove the old release $d"; continue; fi
        rm -rf "$d"
        say "removed the old release $d (kept: $KEEP_RELEASES)"
    done
}

install_code() {  # install_code upgrade|keep
    local sums id rel cur
    sums="$(mktemp)"
    manifest >"$sums"
    [ -s "$sums" ] || die "found no files to install in $SRC"
    id="$(release_version)-$(sha256sum <"$sums" | cut -c1-12)"
    rel="$OPT/releases/$id"
    cur="$(release_of current)"
    if [ -n "$cur" ] && [ "$1" = keep ]; then
        [ "$cur" = "$id" ] || say "code: release $cur is installed (this checkout is $id: --upgrade to switch)"
        rm -f "$sums"; return 0
    fi
    if [ "$cur" = "$id" ] && [ -f "$rel/SHA256SUMS" ]; then
        [ "$1" = keep ] || say "code: release $id is installed already: nothing to upgrade"
        rm -f "$sums"; return 0
    fi
    [ "$dry_run" -eq 1 ] || mkdir -p "$OPT/releases"
    [ -f "$rel/SHA256SUMS" ] || build_release "$id" "$sums"
    rm -f "$sums"
    if [ -n "$cur" ] && [ "$cur" != "$id" ]; then switch_link previous "$cur"; fi
    switch_link current "$id"
    prune_releases
    upgraded_from="$cur"
}

# -- the unit, udev, polkit, the command ---------------------------------------------------
install_unit() {
    put "$PKG/$UNIT" "$UNIT_PATH" 0644
    if [ "$set_allow_net" -eq 1 ]; then
        if [ "$allow_net" = any ]; then
            remove "$DROPIN"
        else
            put_text "# Made by packaging/install.sh --allow-net (docs/hardening.md): the service
# reaches these networks only (the broker, the DNS server unless it is local).
[Service]
IPAddressDeny=any
IPAddressAllow=localhost
IPAddressAllow=${allow_net//,/ }
" "$DROPIN" 0644
        fi
    fi
}

install_udev() {
    put "$PKG/devices.conf.example" "$ETC/devices.conf.example" 0644
    if [ ! -f "$ETC/devices.conf" ]; then
        remove "$UDEV_RULES"
        return 0
    fi
    local rules
    rules="$(mktemp)"
    if ! python3 "$PKG/udev_rules.py" "$ETC/devices.conf" >"$rules"; then
        rm -f "$rules"
        die "$ETC/devices.conf has an error (above): the udev rule was not changed"
    fi
    local before=$changed
    changed=0
    put "$rules" "$UDEV_RULES" 0644
    rm -f "$rules"
    if [ "$changed" -eq 1 ] && [ "$live" -eq 1 ] && command -v udevadm >/dev/null 2>&1; then
        run udevadm control --reload
        run udevadm trigger --action=change --subsystem-match=tty --subsystem-match=usb
    fi
    [ "$changed" -eq 1 ] || changed=$before
}

install_extras() {
    put "$PKG/smartcorr" "$WRAPPER" 0755
    if [ -d "$ROOT/usr/share/polkit-1" ] || [ -d "$POLKIT_DIR" ]; then
        put "$PKG/smartcorr-poweroff.rules" "$POLKIT_DIR/50-smartcorr.rules" 0644
    fi
}

# -- the service ------------------------------------------------------------------------------
systemctl_reload() {
    [ "$live" -eq 1 ] && command -v systemctl >/dev/null 2>&1 || return 0
    [ -d /run/systemd/system ] || { say "systemd is not running here: no daemon-reload"; return 0; }
    if [ "$dry_run" -eq 1 ]; then say "would run: systemctl daemon-reload"; return 0; fi
    systemctl daemon-reload
}

service_active() {
    [ "$live" -eq 1 ] && [ -d /run/systemd/system ] && systemctl is-active --quiet "$UNIT"
}

restart_after_switch() {  # restart_after_switch FROM_RELEASE
    local from="$1"
    [ "$live" -eq 1 ] && [ -d /run/systemd/system ] || return 0
    if ! service_active; then
        say "the service is not running: start it with systemctl enable --now $UNIT"
        return 0
    fi
    if [ "$dry_run" -eq 1 ]; then say "would run: systemctl restart $UNIT"; return 0; fi
    say "restarting $UNIT"
    if systemctl restart "$UNIT" && service_active; then
        say "$UNIT runs release $(release_of current)"
        return 0
    fi
    [ -n "$from" ] || die "$UNIT did not come back (journalctl -u $UNIT)"
    say "$UNIT did not come back on release $(release_of current): putting back $from"
    switch_link previous "$(release_of current)"
    switch_link current "$from"
    systemctl restart "$UNIT" || true
    die "upgrade undone: $UNIT runs release $from again (journalctl -u $UNIT says why the new one failed)"
}

# -- the actions ----------------------------------------------------------------------------
lock_install() {
    [ "$dry_run" -eq 0 ] || return 0
    mkdir -p "$OPT"
    exec 9>>"$OPT/.install.lock"
    flock -n 9 || die "another install.sh is running (it holds $OPT/.install.lock)"
}

upgraded_from=""
lock_install
case "$action" in
    fix-ownership)
        [ -n "$(uid_of "$USER_NAME")" ] \
            || usage_error "there is no $USER_NAME user yet: run packaging/install.sh first"
        ensure_dirs
        ;;
    rollback)
        prev="$(release_of previous)"
        [ -n "$prev" ] && [ -f "$OPT/releases/$prev/SHA256SUMS" ] \
            || die "no previous release to go back to (in $OPT/releases)"
        cur="$(release_of current)"
        switch_link previous "$cur"
        switch_link current "$prev"
        restart_after_switch ""
        ;;
    install|upgrade)
        ensure_user
        ensure_dirs
        if [ "$action" = upgrade ]; then install_code upgrade; else install_code keep; fi
        install_unit
        install_udev
        install_extras
        [ "$changed" -eq 0 ] || systemctl_reload
        if [ -n "$upgraded_from" ]; then restart_after_switch "$upgraded_from"; fi
        ;;
esac

if [ "$changed" -eq 0 ]; then
    say "nothing to change: the installation is as this checkout wants it"
elif [ "$dry_run" -eq 1 ]; then
    say "dry run: nothing was changed"
fi
if [ "$action" = install ] && [ "$dry_run" -eq 0 ] && [ ! -f "$IDENTITY/gateway.json" ]; then
    say "next: sudo smartcorr provision init --identity-dir /etc/smartcorr/identity --gateway-id ID (docs/installing.md)"
fi
exit 0
