"""The webhook sink: one POST per transaction, acknowledged only after a 2xx.

    POST <url>
    Content-Type: application/json
    Idempotency-Key: 0/16B3748            (commit LSN; "-<part>" for a part of a huge transaction;
                                           "seq-<first>-<last>" for a poll transaction;
                                           "-w<i>of<N>" for worker i's slice under --workers N)
    X-Cdc-Signature: sha256=<hex>         (HMAC-SHA256 of the body, when a secret is set)

    {"xid": 741, "commit_lsn": "0/16B3748", "events": [<records as cdc.events.record makes them>]}

A part of a huge transaction also carries "part" (0, 1, ...) and "final" in the body. Under
`--workers N` each transaction comes as up to N POSTs, one a worker, each with the events of the
streams that worker owns (in version order) and "slice": "w<i>of<N>" in the body.

Delivery is at-least-once: after a crash, or a 2xx the receiver sent but we never read, the
same transaction comes again with the same Idempotency-Key, so the receiver can drop repeats.
Retries: connection errors, timeouts, 5xx, 408 and 429 (Retry-After honoured), with capped
exponential backoff and jitter; any other 4xx is the request's fault and is not retried.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import logging
import random
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from .errors import ConfigError, SinkError
from .events import Transaction, wire_records

log = logging.getLogger("cdc.webhook")

USER_AGENT = "cdc-webhook/1"
# Retry-After is honoured, but a receiver asking for an hour should not park us for an hour.
RETRY_AFTER_MAX = 300.0
# A kept-alive connection the receiver closed while idle fails on first use: resend at once.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                     http.client.CannotSendRequest)


def idempotency_key(tx: Transaction, slice_label: str | None = None) -> str:
    """Stable across retries and restarts: the commit LSN (plus the part of a split transaction),
    or for a poll transaction, which has no LSN, its first and last seq; plus the worker's slice
    label under --workers N (the same N cuts a transaction the same way every time)."""
    if tx.commit_lsn is not None:
        key = str(tx.commit_lsn)
    else:
        key = f"seq-{tx.events[0].seq}-{tx.events[-1].seq}"
    if tx.part > 0 or not tx.final:
        key += f"-{tx.part}"
    if slice_label:
        key += f"-{slice_label}"
    return key


def body(tx: Transaction, slice_label: str | None = None) -> bytes:
    doc: dict[str, Any] = {
        "xid": tx.xid,
        "commit_lsn": str(tx.commit_lsn) if tx.commit_lsn is not None else None,
        "events": wire_records(tx),  # payloads spliced as exact text
    }
    if tx.part > 0 or not tx.final:
        doc["part"] = tx.part
        doc["final"] = tx.final
    if slice_label:
        doc["slice"] = slice_label
    return orjson.dumps(doc)


def signature(secret: str, payload: bytes) -> str:
    """The X-Cdc-Signature value: receivers compute the same and compare in constant time."""
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


class WebhookSink:
    """POSTs each transaction that has events to `url`; `write` returns after a 2xx.

    `max_attempts`: None retries forever (the feed waits for the receiver); a number gives up
    with SinkError after that many failed attempts. Setting `stop_event` interrupts a backoff
    wait with SinkError at once: the transaction is then not acknowledged, and comes again.
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        timeout: float = 10.0,
        max_attempts: int | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        stop_event: threading.Event | None = None,
        slice_label: str | None = None,
    ):
        parts = urlsplit(url)
        try:
            parts.port
        except ValueError:
            raise ConfigError(f"webhook URL has an invalid port: {_without_credentials(url)!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"webhook URL must be http(s)://host[:port]/path, got {_without_credentials(url)!r}")
        if max_attempts is not None and max_attempts < 1:
            raise ConfigError("webhook max_attempts must be at least 1 (or None: retry forever)")
        self.url = url
        self.display_url = _without_credentials(url)
        self.secret = secret
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stop_event = stop_event
        self.slice_label = slice_label
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        self._conn: http.client.HTTPConnection | None = None
        self._sent_on_conn = 0

    # -- the Sink protocol ----------------------------------------------------------------

    def write(self, tx: Transaction) -> None:
        if not tx.events:
            return
        payload = body(tx, self.slice_label)
        headers = dict(self._headers)
        headers["Idempotency-Key"] = idempotency_key(tx, self.slice_label)
        if self.secret:
            headers["X-Cdc-Signature"] = signature(self.secret, payload)
        self._deliver(payload, headers)

    def flush(self) -> None:
        pass  # write returns only after the receiver's 2xx: nothing is pending

    def close(self) -> None:
        self._disconnect()

    # -- delivery -------------------------------------------------------------------------

    def _deliver(self, payload: bytes, headers: dict[str, str]) -> None:
        key = headers["Idempotency-Key"]
        delay = self.backoff_initial
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                status, reason, retry_after_header, snippet = self._post(payload, headers)
            except (OSError, http.client.HTTPException) as err:
                self._disconnect()
                problem = _describe(err)
            else:
                if 200 <= status < 300:
                    if attempt > 1:
                        log.info("webhook %s accepted %s after %d attempts", self.display_url, key, attempt)
                    return
                problem = f"answered {status} {reason}".rstrip() + (f" ({snippet})" if snippet else "")
                if not (status >= 500 or status in (408, 429)):
                    raise SinkError(
                        f"webhook {self.display_url} {problem} for {key}: not retried, a 4xx is the "
                        "request's fault; fix the URL, the secret or the receiver"
                    )
                retry_after = _retry_after(retry_after_header)
            if self.max_attempts is not None and attempt >= self.max_attempts:
                raise SinkError(
                    f"webhook {self.display_url} gave up on {key} after {attempt} attempts, last: {problem}; "
                    "the transaction was not acknowledged"
                )
            wait = min(retry_after, RETRY_AFTER_MAX) if retry_after is not None else random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.backoff_max)
            log.warning("webhook %s %s for %s (attempt %d): retrying in %.1f s",
                        self.display_url, problem, key, attempt, wait)
            if self._sleep(wait):
                raise SinkError("stopped during retries; the transaction was not acknowledged")

    def _post(self, payload: bytes, headers: dict[str, str]) -> tuple[int, str, str | None, str]:
        """One request on the kept-alive connection: (status, reason, Retry-After, body start)."""
        for fresh in (False, True):
            conn = self._connection()
            reused = self._sent_on_conn > 0
            try:
                conn.request("POST", self._path, body=payload, headers=headers)
                self._sent_on_conn += 1
                resp = conn.getresponse()
                data = resp.read()  # read it all, or the connection cannot be reused
            except _STALE_CONNECTION:
                self._disconnect()
                if reused and not fresh:
                    continue
                raise
            if resp.will_close:
                self._disconnect()
            snippet = " ".join(data[:200].decode(errors="replace").split()) if resp.status >= 300 else ""
            return resp.status, resp.reason or "", resp.getheader("Retry-After"), snippet
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
            self._sent_on_conn = 0
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _sleep(self, seconds: float) -> bool:
        """Wait; True when stop_event was set meanwhile."""
        if self.stop_event is None:
            time.sleep(seconds)
            return False
        return self.stop_event.wait(seconds)


class WebhookSinks:
    """`--workers N`: one WebhookSink a worker, each with its own connection, posting its
    worker's slice of each transaction under the key suffix "-w<i>of<N>"."""

    def __init__(self, url: str, workers: int, **kwargs: Any):
        self.per_worker = [WebhookSink(url, slice_label=f"w{i}of{workers}", **kwargs) for i in range(workers)]

    def write(self, tx: Transaction) -> None:
        raise TypeError("WebhookSinks are written by a ParallelDispatcher, one sink per worker")

    def flush(self) -> None:
        for sink in self.per_worker:
            sink.flush()

    def close(self) -> None:
        for sink in self.per_worker:
            sink.close()


def _retry_after(value: str | None) -> float | None:
    # Seconds only: an HTTP date would need the receiver's clock to agree with ours.
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "refused the connection"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"failed: {type(err).__name__}" + (f": {text}" if text else "")


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
