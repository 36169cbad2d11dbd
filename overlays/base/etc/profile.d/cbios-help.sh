# shellcheck shell=bash
# `help slot` prints the slot CLI's help; every other topic is bash's own.
help() {
    if [ "${1:-}" = slot ]; then /usr/bin/slot help; else builtin help "$@"; fi
}
