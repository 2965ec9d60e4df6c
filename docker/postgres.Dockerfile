# PostgreSQL with wal2json and logical decoding on: what `cdc run` streams from.
# Used by compose.yaml and by tests/conftest.py (testcontainers, build context = docker/).
# The minor is pinned: 15.19+ added output_plugin_libraries (see postgres-entrypoint.sh).
FROM postgres:15.18-bookworm

# The official image ships the PGDG apt repository, which builds wal2json for each major.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15-wal2json \
 && rm -rf /var/lib/apt/lists/* \
 && test -f /usr/lib/postgresql/15/lib/wal2json.so

COPY postgres-entrypoint.sh /usr/local/bin/cdc-postgres-entrypoint.sh
RUN chmod 0755 /usr/local/bin/cdc-postgres-entrypoint.sh

ENTRYPOINT ["cdc-postgres-entrypoint.sh"]
CMD ["postgres", "-c", "wal_level=logical", "-c", "max_replication_slots=10", "-c", "max_wal_senders=10"]
