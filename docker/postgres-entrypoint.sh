#!/bin/sh
# The official entrypoint, plus wal2json in output_plugin_libraries on servers that have that
# allow-list (PostgreSQL 15.19+, 16.15+, 17.11+, 18.6+): there a wal2json slot fails with
# SQLSTATE 42501 unless the list names it. Older servers refuse to start when the setting is
# named at all, so it is decided from the binary's version at every start and never written
# into the data directory: the same volume keeps working across a minor upgrade or downgrade.
set -eu

if [ "${1:-}" = postgres ]; then
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-1.pgdg120+1)" -> "15.18"
    version=$(postgres --version | sed -E 's/^[^0-9]*([0-9]+)\.([0-9]+).*/\1.\2/')
    major=${version%%.*}
    minor=${version#*.}
    case "$major" in
        15) first=19 ;;
        16) first=15 ;;
        17) first=11 ;;
        18) first=6 ;;
        *) if [ "$major" -ge 19 ]; then first=0; else first=999; fi ;;
    esac
    if [ "$minor" -ge "$first" ]; then
        set -- "$@" -c "output_plugin_libraries=pgoutput,test_decoding,wal2json"
    fi
fi

exec docker-entrypoint.sh "$@"
