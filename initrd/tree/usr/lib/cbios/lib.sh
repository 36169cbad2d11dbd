# Shell functions shared by the initrd's flasher and netboot (sourced, not run).
# shellcheck shell=bash

CBIOS_PORT=/dev/virtio-ports/org.cbios.ready
export CBIOS_BOOT_LABEL=cbios-boot
CBIOS_TAG=${CBIOS_TAG:-cbios}

say() { echo "$CBIOS_TAG: $*"; }

# A verdict line: on the console and on the virtio-serial port a supervisor reads.
report() {
    say "$*"
    if [ -c "$CBIOS_PORT" ]; then printf '%s\n' "$*" >"$CBIOS_PORT" || true; fi
}

# The value of KEY=value on the kernel command line (the last one wins), or $2.
cmdline_value() {
    local arg value=${2-} args
    read -r -a args </proc/cmdline
    for arg in "${args[@]}"; do
        case $arg in "$1"=*) value=${arg#*=} ;; esac
    done
    printf '%s' "$value"
}

cmdline_has() { grep -qE "(^| )$1( |=|$)" /proc/cmdline; }

# wait_for SPEC [SECONDS]: the block device for LABEL=x or /dev/x, once it exists (bounded).
wait_for() {
    local dev i
    for i in $(seq $((${2:-60} * 2))); do
        dev=$(blkid -l -o device -t "$1" 2>/dev/null || true)
        [ -z "$dev" ] && [ -b "$1" ] && dev=$1
        if [ -n "$dev" ]; then echo "$dev"; return 0; fi
        [ "$i" = 1 ] && udevadm settle --timeout=10 >/dev/null 2>&1
        sleep 0.5
    done
    return 1
}

# fetch_stream URL SIZE STATE: URL's SIZE bytes to stdout as they arrive, and never a byte
# more (head -c: curl's --max-filesize trusts a Content-Length the server may leave out). A
# transfer that breaks off (a server restarted, a link down, 30 s without progress) is taken
# up where it stopped, with an HTTP Range request (curl -C refuses a 206 that starts
# elsewhere, and a 200; anything but 206 is taken as nothing), after a pause; at most
# FETCH_TRIES tries in all, each within a time bound for the bytes it has left.
# STATE.got: the bytes passed on so far; STATE.err: curl's last words. Status: curl's last.
FETCH_TRIES=$(cmdline_value cbios.fetch.tries 6)
[[ $FETCH_TRIES =~ ^[1-9][0-9]?$ ]] || FETCH_TRIES=6
fetch_stream() {
    local url=$1 size=$2 state=$3 got=0 try status n code left pause
    echo 0 >"$state.got"
    for ((try = 1; ; try++)); do
        left=$((size - got))
        curl -fsS --connect-timeout 10 --speed-time 30 --speed-limit 1024 --max-filesize "$left" \
            --max-time $((60 + left / (256 << 10))) -C "$got" \
            -w '%{stderr}bytes=%{size_download} code=%{http_code}\n' "$url" 2>"$state.err" | head -c "$left"
        status=${PIPESTATUS[0]}
        n=$(sed -n 's/^bytes=\([0-9]*\) .*/\1/p' "$state.err" | tail -n 1)
        code=$(sed -n 's/^bytes=.* code=\([0-9]*\)$/\1/p' "$state.err" | tail -n 1)
        n=${n:-0}
        if [ "$code" != "$([ "$got" = 0 ] && echo 200 || echo 206)" ]; then
            n=0  # a 416, say: curl counts a body it did not pass on
            [ "$status" != 0 ] || status=33
        fi
        [ "$n" -le "$left" ] || n=$left  # head passed on no more
        got=$((got + n))
        echo "$got" >"$state.got"
        if [ "$got" = "$size" ] && [ "$status" = 0 ]; then return 0; fi
        if [ "$got" = "$size" ] || [ "$status" = 33 ] || [ "$status" = 63 ]; then
            # More than the bytes left, or no resume: another try would not help.
            echo "the server sent other bytes than the $left left (HTTP $code): it does not resume" \
                "(HTTP Range) or the file is not the signed one" >>"$state.err"
            [ "$status" != 0 ] && [ "$status" != 23 ] || status=63
            return "$status"
        fi
        [ "$status" != 0 ] || status=18  # whole, says the server, yet short of SIZE
        [ "$try" -lt "$FETCH_TRIES" ] || return "$status"
        pause=$((1 << try)); [ "$pause" -le 20 ] || pause=20
        say "${url%%\?*}: broken off at $((got >> 20)) of $((size >> 20)) MiB (curl status $status:" \
            "$(grep -v '^bytes=' "$state.err" | tail -n 1)); resuming in $pause s, try $((try + 1)) of $FETCH_TRIES" >&2
        sleep "$pause"
    done
}

# The MAC of the NIC the node booted from (BOOTIF=01-aa-bb-.. from iPXE), else of the first NIC.
boot_mac() {
    local bootif mac
    bootif=$(cmdline_value BOOTIF)
    if [ -n "$bootif" ]; then
        mac=${bootif#01-}
        echo "${mac//-/:}" | tr 'A-F' 'a-f'
        return
    fi
    for mac in /sys/class/net/*/address; do
        case $mac in */lo/address) continue ;; esac
        cat "$mac"
        return
    done
}

# net_up: DHCP on the boot NIC (or every Ethernet NIC) with systemd-networkd; bounded.
net_up() {
    local mac
    mac=$(cmdline_value BOOTIF)
    mkdir -p /run/systemd/network
    {
        echo "# Written by the CBIOS initrd: DHCP on the NIC the node booted from."
        echo "[Match]"
        if [ -n "$mac" ]; then echo "MACAddress=$(boot_mac)"; else echo "Type=ether"; fi
        printf '\n[Network]\nDHCP=ipv4\n\n[DHCPv4]\nClientIdentifier=mac\n'
    } >/run/systemd/network/10-cbios-initrd.network
    # A restart: its socket may have started networkd already, before this file existed.
    # --no-block: this runs early in the initrd; never wait on the job queue unbounded.
    systemctl restart --no-block systemd-networkd.service
    /lib/systemd/systemd-networkd-wait-online --any --ipv4 --timeout="${1:-90}" >/dev/null 2>&1
}

# The boot state: GRUB's environment block on the boot partition, read into ENV and
# written back in place (GRUB's save_env finds the file by its blocks).
declare -gA ENV=()
GRUBENV=''
env_load() {
    GRUBENV=$1
    ENV=()
    local line
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in '#'* | '') continue ;; *=*) ENV[${line%%=*}]=${line#*=} ;; esac
    done <"$GRUBENV"
}
# What GRUB chooses a copy by comes first, within the block's first sector (the order of
# cbios/node/boot/bootenv.py's STATE_KEYS): a write torn between the two sectors leaves these
# all old or all new.
ENV_STATE_KEYS=(cbios_active cbios_root_state cbios_root_tries cbios_root_verity
    cbios_spare_state cbios_spare_tries cbios_spare_verity)
env_save() {
    local body="# GRUB Environment Block"$'\n' key
    for key in "${ENV_STATE_KEYS[@]}"; do
        if [ -n "${ENV[$key]+set}" ]; then body+="$key=${ENV[$key]}"$'\n'; fi
    done
    if [ ${#body} -gt 512 ]; then say "boot state too large"; return 1; fi
    for key in $(printf '%s\n' "${!ENV[@]}" | sort); do
        if [[ " ${ENV_STATE_KEYS[*]} " != *" $key "* ]]; then body+="$key=${ENV[$key]}"$'\n'; fi
    done
    if [ ${#body} -gt 1024 ]; then say "boot state too large"; return 1; fi
    { printf '%s' "$body"; head -c $((1024 - ${#body})) /dev/zero | tr '\0' '#'; } \
        | dd of="$GRUBENV" bs=1024 count=1 iflag=fullblock conv=notrunc,fsync status=none
}

# json_values FILE FILTER...: FILE's value at each jq FILTER, read in one jq pass (a start
# of jq costs a good part of a second under emulation), into JSON_VALUE[FILTER] as compact
# JSON on one line: a string in its quotes, a missing value null. Fails unless FILE is a
# JSON object and each FILTER gives it exactly one value.
# shellcheck disable=SC2034 # read by the scripts that source this
declare -A JSON_VALUE=()
# shellcheck disable=SC2034
json_values() {
    local file=$1 out values=() i
    shift
    out=$(jq -r "if type == \"object\" then [$(IFS=,; printf '%s' "$*")][] | tojson
                 else error(\"not an object\") end" "$file" 2>/dev/null) || return 1
    mapfile -t values <<<"$out"
    [ "${#values[@]}" = $# ] || return 1
    JSON_VALUE=()
    for ((i = 1; i <= $#; i++)); do JSON_VALUE[${!i}]=${values[i - 1]}; done
}

other_copy() { if [ "$1" = root ]; then echo spare; else echo root; fi; }
copy_lv() { if [ "$1" = root ]; then echo root; else echo root-spare; fi; }

# spend_try: the boot state's choice of copy, as grub.cfg makes it: the active copy, and
# if it is new, one try spent; with none left it is bad and the other copy is chosen.
# Saves the state when it changes; sets CHOSEN to the copy.
export CHOSEN=''
spend_try() {
    local active other tries
    active=${ENV[cbios_active]:-root}
    [ "$active" = spare ] || active=root
    other=$(other_copy "$active")
    if [ "${ENV[cbios_${active}_state]:-}" = new ]; then
        tries=${ENV[cbios_${active}_tries]:-0}
        if [[ $tries =~ ^[1-9]$ ]]; then
            ENV[cbios_${active}_tries]=$((tries - 1))
        else
            ENV[cbios_${active}_state]=bad
            ENV[cbios_active]=$other
            ENV[cbios_fallback]="copy $active did not become ready in its tries"
            say "copy $active did not become ready in its tries: falling back to $other"
            active=$other
        fi
        env_save
    fi
    CHOSEN=$active
}

# mark_bad COPY REASON: COPY cannot be loaded; the other copy becomes the active one.
mark_bad() {
    ENV[cbios_$1_state]=bad
    ENV[cbios_active]=$(other_copy "$1")
    ENV[cbios_fallback]=$2
    env_save
}

# dm-verity, as cbios/node/boot/verity.py lays it out: root.img is the squashfs image in whole
# 4 KiB blocks, then its hash tree (sha256, no salt, no superblock); VERITY is
# ROOTHASH:BLOCKS (the signed manifest's verity.param).
verity_valid() { [[ $1 =~ ^[0-9a-f]{64}:[1-9][0-9]{0,9}$ ]]; }
verity_table() {  # verity_table DEV VERITY
    local hash=${2%%:*} blocks=${2##*:}
    echo "0 $((blocks * 8)) verity 1 $1 $1 4096 4096 $blocks $blocks sha256 $hash -"
}
# verity_open NAME DEV VERITY: /dev/mapper/NAME, DEV read through dm-verity.
verity_open() {
    verity_valid "$3" || { say "not a verity parameter: '$3'"; return 1; }
    dmsetup remove "$1" >/dev/null 2>&1 || true
    dmsetup create "$1" --readonly --table "$(verity_table "$2" "$3")" || return 1
    udevadm settle --timeout=10 >/dev/null 2>&1 || true
    [ -b "/dev/mapper/$1" ]
}
# verity_check DEV VERITY: every data block of DEV read through dm-verity (the kernel
# checks each against the root hash); fails on the first that does not match.
verity_check() {
    local name=cbios-check-$$ rc=0
    verity_open "$name" "$1" "$2" || return 1
    cat "/dev/mapper/$name" >/dev/null || rc=1
    dmsetup remove --retry "$name" >/dev/null 2>&1 || true
    return $rc
}

# The signed manifest: what verifies it, and what the flasher and a diskless boot take from it.
CBIOS_KEY=/usr/lib/cbios/update-key.pem
# manifest_verify DIR: DIR/manifest.json's Ed25519 signature (DIR/manifest.json.sig) verifies
# with the key this initrd carries. Nothing in a manifest is believed before.
manifest_verify() {
    [ -s "$CBIOS_KEY" ] && openssl pkeyutl -verify -pubin -inkey "$CBIOS_KEY" -rawin -in "$1/manifest.json" \
        -sigfile "$1/manifest.json.sig" >/dev/null 2>&1
}
# VAR FILTER PATTERN: each value read in one jq pass and checked against its pattern.
NUM='[0-9]{1,15}' SHA='[0-9a-f]{64}' NAME='[A-Za-z0-9][A-Za-z0-9._-]{0,63}'
MANIFEST_TAKEN=(
    CBIOS_PROFILE .profile "$NAME"
    CBIOS_VERSION .version '[0-9]+(\.[0-9]+){0,3}'
    CBIOS_OBJECT_ID .layout.object_id '[0-9]{11}'
    CBIOS_VG .layout.vg '[a-z][a-z0-9_]{0,31}'
    CBIOS_BOOT_SIZE .layout.boot_size "$NUM"
    CBIOS_ROOT_SIZE .layout.root_size "$NUM"
    CBIOS_VAR_SIZE .layout.var_size "$NUM"
    CBIOS_SWAP_SIZE .layout.swap_size "$NUM"
    CBIOS_TRIES .layout.tries '[1-9]'
    root_sha '.artifacts["root.img"].sha256' "$SHA"
    root_size '.artifacts["root.img"].size' "$NUM"
    grub_sha '.artifacts["grub.cfg"].sha256' "$SHA"
    kernel_sha '.artifacts["vmlinuz"].sha256' "$SHA"
    initrd_sha '.artifacts["initrd.img"].sha256' "$SHA"
    root_verity .verity.param "$SHA:[1-9][0-9]{0,9}"
)
# shellcheck disable=SC2034 # set for the scripts that source this
CBIOS_PROFILE='' CBIOS_VERSION='' CBIOS_OBJECT_ID='' root_sha='' root_size='' root_verity='' grub_sha='' \
    kernel_sha='' initrd_sha=''
# manifest_take FILE: MANIFEST_TAKEN's variables from the (verified) manifest FILE; else 1,
# with WHY saying what is wrong.
why=''
# shellcheck disable=SC2034
manifest_take() {
    local filters=() i value
    for ((i = 1; i < ${#MANIFEST_TAKEN[@]}; i += 3)); do filters+=("${MANIFEST_TAKEN[i]}"); done
    json_values "$1" "${filters[@]}" || { why="manifest.json: not a CBIOS manifest"; return 1; }
    for ((i = 0; i < ${#MANIFEST_TAKEN[@]}; i += 3)); do
        value=${JSON_VALUE[${MANIFEST_TAKEN[i + 1]}]}
        [ "$value" != null ] || { why="manifest.json: no ${MANIFEST_TAKEN[i + 1]}"; return 1; }
        if [[ $value =~ ^\"(.*)\"$ ]]; then value=${BASH_REMATCH[1]}; fi
        if ! [[ $value =~ ^(${MANIFEST_TAKEN[i + 2]})$ ]]; then
            why="manifest.json: ${MANIFEST_TAKEN[i + 1]} is not what a CBIOS manifest holds ('${value:0:40}')"
            return 1
        fi
        printf -v "${MANIFEST_TAKEN[i]}" '%s' "$value"
    done
}
