"""The one HTTP client for components that talk to a server (the ``remote`` judge, the
``vllm_server`` generator): JSON over HTTP(S), standard library only.

What it guarantees, whatever the server does:

- **The key never leaves its origin.** Redirects are never followed: a 3xx is a failure
  naming where it pointed, so ``Authorization`` goes only to the configured address.
  (Proxies from the environment are not used either.)
- **Secrets are redacted** from everything that comes back: a reply or an error body
  that echoes the key has it replaced by ``[redacted]`` before anyone stores it.
- **``timeout_s`` is a whole-request deadline** per attempt: connect, send, headers and
  body together. A watchdog shuts the socket when it passes, so a server trickling one
  byte at a time cannot stretch it.
- **``max_response_bytes`` caps a reply**: a longer one is a failure, never read whole.
- **Every failure is a value, not an exception**: refused connections, timeouts, a
  connection closed mid-body, HTTP errors and malformed JSON come back as
  ``Result(error=...)`` after the retries (``retries`` extra attempts for retryable ones,
  waiting ``backoff_s * 2^k`` before attempt k+1).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
REDACTED = "[redacted]"


@dataclass
class Result:
    """One request after its retries: ``data`` (the parsed JSON) or ``error``."""

    data: object | None
    error: str | None
    attempts: int
    status: int | None = None


class _Failure(Exception):
    def __init__(self, message: str, retry: bool, status: int | None = None):
        super().__init__(message)
        self.retry = retry
        self.status = status


class HttpClient:
    """JSON requests to one origin (``base_url``: scheme, host, port and a path prefix)."""

    def __init__(self, base_url: str, *, timeout_s: float, max_response_bytes: int,
                 headers: dict[str, str] | None = None, secrets: tuple[str, ...] = (),
                 retries: int = 0, backoff_s: float = 1.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.headers = dict(headers or {})
        self.secrets = tuple(s for s in secrets if s)
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, REDACTED)
        return text

    def post_json(self, path: str, payload: dict | None, parse=None, *, json_reply: bool = True,
                  retries: int | None = None, timeout_s: float | None = None) -> Result:
        """POST ``payload`` to ``{base_url}{path}``; retried; never raises for the network.

        ``parse(data)`` turns the reply's JSON into ``Result.data``; if it raises
        ValueError, KeyError, IndexError or TypeError the reply is malformed (retried).
        ``json_reply=False``: the reply is text (vLLM's adapter endpoints answer so).
        ``payload=None`` sends no body. ``retries`` / ``timeout_s`` override the client's
        for this request.
        """
        body = b"" if payload is None else json.dumps(payload).encode()
        return self._attempts("POST", path, body, parse, json_reply, retries, timeout_s)

    def get_json(self, path: str, parse=None, *, json_reply: bool = True, retries: int | None = None,
                 timeout_s: float | None = None) -> Result:
        """GET ``{base_url}{path}``, as ``post_json`` (a health check: ``json_reply=False``)."""
        return self._attempts("GET", path, None, parse, json_reply, retries, timeout_s)

    def _attempts(self, method, path, body, parse, json_reply, retries, timeout_s) -> Result:
        retries = self.retries if retries is None else retries
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        error, status = "no attempt", None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                data = self._once(method, path, body, json_reply, timeout_s)
                if parse is not None:
                    try:
                        data = parse(data)
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        raise _Failure(f"malformed reply: {type(e).__name__}: {e}", retry=True,
                                       status=200) from None
                return Result(data=data, error=None, attempts=attempt + 1, status=200)
            except _Failure as f:
                error, status = self.redact(str(f)), f.status
                if not f.retry:
                    return Result(data=None, error=error, attempts=attempt + 1, status=status)
        return Result(data=None, error=error, attempts=retries + 1, status=status)

    # -- one attempt ---------------------------------------------------------------

    def _once(self, method: str, path: str, body: bytes | None, json_reply: bool = True,
              timeout_s: float | None = None):
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout_s)
        expired = threading.Event()

        def expire():  # the whole-request deadline: cut the socket whatever it is doing
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(timeout_s, expire)
        timer.daemon = True
        timer.start()
        try:
            headers = {**({} if body is None else {"Content-Type": "application/json",
                                                   "Content-Length": str(len(body))}),
                       **self.headers}
            conn.request(method, self.prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = self._read(resp)
        except _Failure:
            raise
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set() or isinstance(e, TimeoutError):
                raise _Failure(f"timed out: no complete reply within timeout_s = "
                               f"{timeout_s:g} s (the whole request)", retry=True) from None
            raise _Failure(f"connection: {type(e).__name__}: {e}", retry=True) from None
        finally:
            timer.cancel()
            conn.close()
        if expired.is_set():
            raise _Failure(f"timed out: no complete reply within timeout_s = {timeout_s:g} s "
                           "(the whole request)", retry=True)
        text = self.redact(raw.decode("utf-8", "replace"))
        if 300 <= resp.status < 400:
            target = urljoin(f"{self.origin}{self.prefix}{path}", resp.getheader("Location") or "")
            raise _Failure(f"HTTP {resp.status}: redirect to {self.redact(target)} not followed "
                           f"(credentials go only to {self.origin}); set the url to the "
                           "final address", retry=False, status=resp.status)
        if resp.status >= 400:
            detail = " ".join(text[:200].split())
            raise _Failure(f"HTTP {resp.status}: {detail}".strip(),
                           retry=resp.status in RETRY_STATUS, status=resp.status)
        if not json_reply:
            return text
        try:
            return json.loads(text)
        except ValueError as e:
            raise _Failure(f"malformed reply: not JSON ({e})", retry=True, status=resp.status) from None

    def _read(self, resp: http.client.HTTPResponse) -> bytes:
        cap = self.max_response_bytes
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > cap:
            raise _Failure(f"reply of {int(length)} bytes is over max_response_bytes = {cap}",
                           retry=False, status=resp.status)
        chunks, size = [], 0
        while True:
            chunk = resp.read(min(65536, cap + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                raise _Failure(f"reply is over max_response_bytes = {cap}", retry=False,
                               status=resp.status)
        if length and length.isdigit() and size < int(length):
            raise _Failure(f"connection: IncompleteRead: the server closed the connection after "
                           f"{size} of {length} bytes", retry=True, status=resp.status)
        return b"".join(chunks)
