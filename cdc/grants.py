"""The least privilege each feature needs, as data: what `cdc setup --grant` grants, what
`cdc check` verifies, and what README's table of grants lists (a test holds the three together).

A role that is neither superuser nor owner runs cdc with LOGIN (REPLICATION for the stream) and
these grants; the events table itself is only read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg

from .store import DEFAULT_TABLE, EventTable


@dataclass(frozen=True)
class Grant:
    privileges: tuple[str, ...]
    kind: str  # "TABLE", "SCHEMA" or "SEQUENCE"
    name: str  # qualified

    def sql(self, role: str) -> str:
        target = "SCHEMA " + self.name if self.kind == "SCHEMA" else f"{self.kind} {self.name}"
        return f"GRANT {', '.join(self.privileges)} ON {target} TO {quote_ident(role)};"


def quote_ident(name: str) -> str:
    """`name` as SQL, quoted only when it must be (fixes are read, and pasted, by people)."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else '"' + name.replace('"', '""') + '"'


_BOOKKEEPING = (Grant(("USAGE",), "SCHEMA", "cdc"),
                Grant(("SELECT", "INSERT", "UPDATE", "DELETE"), "TABLE", "cdc.checkpoints"))
_RECORD = (Grant(("SELECT", "INSERT", "DELETE"), "TABLE", "cdc.deliveries"),
           Grant(("SELECT", "INSERT", "DELETE"), "TABLE", "cdc.delivery_runs"),
           Grant(("SELECT", "INSERT", "DELETE"), "TABLE", "cdc.delivery_fences"),
           Grant(("SELECT", "INSERT", "UPDATE"), "TABLE", "cdc.delivery_horizons"))
_RECONCILE = (Grant(("USAGE",), "SCHEMA", "cdc"), Grant(("SELECT",), "TABLE", "cdc.checkpoints"),
              *(Grant(("SELECT",), "TABLE", g.name) for g in _RECORD))
_DEAD_LETTERS = (Grant(("INSERT",), "TABLE", "cdc.dead_letters"),
                 Grant(("USAGE",), "SEQUENCE", "cdc.dead_letters_id_seq"))

FEATURES = ("run", "record-deliveries", "reconcile", "dead-letters")


def needed(features: tuple[str, ...] | list[str], table: EventTable = DEFAULT_TABLE) -> list[Grant]:
    """The grants the features need, merged per object, in a stable order."""
    reads = (Grant(("USAGE",), "SCHEMA", table.schema), Grant(("SELECT",), "TABLE", table.qualified))
    parts: list[Grant] = []
    for feature in features:
        if feature == "run":
            parts += [*reads, *_BOOKKEEPING]
        elif feature == "record-deliveries":
            parts += _RECORD
        elif feature == "reconcile":
            parts += [*reads, *_RECONCILE]
        elif feature == "dead-letters":
            parts += _DEAD_LETTERS
        else:
            raise ValueError(f"unknown feature {feature!r}: one of {', '.join(FEATURES)}")
    merged: dict[tuple[str, str], list[str]] = {}
    for g in parts:
        privileges = merged.setdefault((g.kind, g.name), [])
        privileges += [p for p in g.privileges if p not in privileges]
    return [Grant(tuple(p), kind, name) for (kind, name), p in merged.items()]


def grant_sql(role: str, features: tuple[str, ...] | list[str] = FEATURES,
              table: EventTable = DEFAULT_TABLE) -> list[str]:
    return [g.sql(role) for g in needed(features, table)]


def _yes(conn: psycopg.Connection, query: str, params: dict[str, object]) -> bool:
    row = conn.execute(query, params).fetchone()
    return bool(row and row[0])


def missing(conn: psycopg.Connection, role: str, features: tuple[str, ...] | list[str],
            table: EventTable = DEFAULT_TABLE) -> list[str]:
    """The GRANT statements `role` still lacks for `features` (objects that do not exist are
    left to the checks that say `cdc setup`)."""
    out = []
    for g in needed(features, table):
        # By oid, read from the catalogs: a name lookup would itself need USAGE on the schema.
        if g.kind == "SCHEMA":
            row = conn.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", (g.name,)).fetchone()
            check = "SELECT has_schema_privilege(%(r)s, %(o)s, %(p)s)"
        else:
            schema, _, name = g.name.partition(".")
            row = conn.execute("SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                               "WHERE n.nspname = %s AND c.relname = %s", (schema, name)).fetchone()
            check = ("SELECT has_sequence_privilege(%(r)s, %(o)s, %(p)s)" if g.kind == "SEQUENCE"
                     else "SELECT has_table_privilege(%(r)s, %(o)s, %(p)s)")
        if row is None:
            continue
        lacking = tuple(p for p in g.privileges if not _yes(conn, check, {"r": role, "o": row[0], "p": p}))
        if lacking:
            out.append(Grant(lacking, g.kind, g.name).sql(role))
    return out
