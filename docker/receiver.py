"""A tiny webhook receiver for the compose demo: prints each delivery, answers 204.

Checks X-Cdc-Signature when CDC_WEBHOOK_SECRET is set, and drops repeats by Idempotency-Key
(cdc delivers at least once: after a crash a transaction comes again with the same key).
"""

import hashlib
import hmac
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ.get("CDC_WEBHOOK_SECRET", "").encode()
SEEN: set[str] = set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the sink expects

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if SECRET:
            expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(self.headers.get("X-Cdc-Signature", ""), expected):
                return self._answer(401)
        key = self.headers.get("Idempotency-Key", "")
        if key in SEEN:
            print(f"repeat {key}: already handled", flush=True)
        else:
            doc = json.loads(body)
            for event in doc["events"]:
                print(json.dumps(event, separators=(",", ":")), flush=True)
            SEEN.add(key)
        self._answer(204)

    def do_GET(self) -> None:
        self._answer(200 if self.path == "/healthz" else 404)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        print(format % args, file=sys.stderr, flush=True)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    print(f"receiver listening on :{port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
