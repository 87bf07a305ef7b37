"""An HTTP reward server (LLaMA-Factory's protocol): POST {"model", "messages"}, read {"scores"}.

Each request has one deadline, `timeout` seconds for resolving the host name, connecting and every
read together (a slow name server or a server that sends one byte at a time cannot hold it longer),
follows at most `MAX_REDIRECTS` redirects and only to http(s) URLs, and reads at most `MAX_REPLY_BYTES`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlparse

import torch

from rlhfkit.errors import fail, shown
from rlhfkit.rewards.base import ScoringBatch, checked_scores

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3
MAX_REPLY_BYTES = 16 << 20
HTTP_SCHEMES = ("http", "https")


class Refused(Exception):
    """A fault that retrying cannot mend: a redirect off http(s), or too many redirects."""


class Deadline:
    """One request's deadline: connections get the time left as their timeout, and each connection
    is shut down when the time is up, which ends any read still waiting on it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self._timers: list[threading.Timer] = []

    def left(self) -> float:
        return max(self.end - time.monotonic(), 1e-3)

    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def watch(self, sock: socket.socket) -> None:
        timer = threading.Timer(self.left(), _shut_down, (sock,))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def connection_class(self, http_class):
        """A factory like `http_class` whose connections keep this deadline."""
        def connection(*args, **kwargs):
            conn = http_class(*args, **kwargs)
            connect = conn.connect

            def connect_within_deadline() -> None:
                conn.timeout = self.left()
                connect()
                self.watch(conn.sock)

            conn.connect = connect_within_deadline
            conn._create_connection = self.create_connection  # http.client's hook for opening the socket
            return conn

        return connection

    def create_connection(self, address: tuple[str, int], timeout=None, source_address=None) -> socket.socket:
        """`socket.create_connection` with the host name resolved within the time left: the resolver
        (`getaddrinfo`) has no timeout of its own, so it runs in a thread the request stops waiting for."""
        host, port = address
        found: dict[str, object] = {}

        def resolve() -> None:
            try:
                found["addresses"] = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            except OSError as error:
                found["error"] = error

        resolver = threading.Thread(target=resolve, daemon=True)
        resolver.start()
        resolver.join(self.left())
        if resolver.is_alive():
            raise TimeoutError(f"resolving {host} took longer than the time left")
        if "error" in found:
            raise found["error"]
        error: OSError = OSError(f"no address for {host}")
        for *_, socket_address in found["addresses"]:  # numeric addresses: create_connection resolves none
            try:
                return socket.create_connection(socket_address[:2], self.left(), source_address)
            except OSError as failure:
                error = failure
        raise error


def _shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _DeadlineOpen:
    """Mixed into urllib's HTTP(S) handlers: their connections obey the request's `Deadline`."""

    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self.deadline.connection_class(http_class), req, **kwargs)


class _DeadlineHTTPHandler(_DeadlineOpen, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPSHandler(_DeadlineOpen, urllib.request.HTTPSHandler):
    pass


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most `MAX_REDIRECTS` redirects, to http(s) URLs only, sending the same POST again."""

    def __init__(self) -> None:
        self.followed = 0

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            target = urljoin(req.full_url, location)
            fault = None
            if urlparse(target).scheme not in HTTP_SCHEMES:
                fault = f"HTTP {code} redirect to {shown(target)}, which is not an http(s) URL"
            elif self.followed >= MAX_REDIRECTS:
                fault = f"more than {MAX_REDIRECTS} redirects (the last to {shown(target)})"
            if fault is not None:
                fp.close()
                raise Refused(fault)
            self.followed += 1
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return urllib.request.Request(newurl, data=req.data, headers=req.headers, method="POST",
                                      origin_req_host=req.origin_req_host, unverifiable=True)


def _opener(deadline: Deadline) -> urllib.request.OpenerDirector:
    """http(s) only (proxies from the environment as usual), with `deadline` and `_Redirects`."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _DeadlineHTTPHandler(deadline),
                    _DeadlineHTTPSHandler(deadline), urllib.request.HTTPDefaultErrorHandler(), _Redirects(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


class ApiReward:
    """Scores by HTTP POST, with a timeout and retries with exponential backoff.

    The request body is `{"model": name, "messages": [full text per sample], "conversations":
    [[{role, content}, ...] per sample]}`: `messages` holds the templated prompt plus response as
    one decoded string each, padding removed (what LLaMA-Factory sends); `conversations` the same
    as structured turns. The
    reply must be `{"scores": [number per sample]}`, finite JSON numbers (not booleans or strings).
    A fault never becomes a silent zero reward: after `retries` retries the run stops with the last
    fault; a redirect off http(s), or more than `MAX_REDIRECTS`, stops it at once.
    """

    def __init__(self, url: str, name: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5) -> None:
        if urlparse(url).scheme not in HTTP_SCHEMES:
            raise fail(f"reward_model '{url}' is not an http(s) URL; reward_model_type: api needs one")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.name = name or "api"

    def _request(self, payload: bytes) -> list:
        deadline = Deadline(self.timeout)
        request = urllib.request.Request(self.url, data=payload, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with _opener(deadline).open(request, timeout=self.timeout) as response:
                body = response.read(MAX_REPLY_BYTES + 1)
        except (urllib.error.HTTPError, Refused):
            raise
        except Exception:
            if deadline.passed():
                raise TimeoutError(f"no complete reply within reward_api_timeout={self.timeout}s") from None
            raise
        finally:
            deadline.cancel()
        if deadline.passed():
            raise TimeoutError(f"no complete reply within reward_api_timeout={self.timeout}s")
        if len(body) > MAX_REPLY_BYTES:
            raise ValueError(f"reply larger than {MAX_REPLY_BYTES} bytes")
        try:
            decoded = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise ValueError(f"reply is not JSON: {body[:80]!r}") from None
        if not isinstance(decoded, dict) or "scores" not in decoded:
            raise ValueError("reply has no 'scores' field")
        return decoded["scores"]

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        conversations = [msgs + [{"role": "assistant", "content": r}] for msgs, r in zip(batch.messages, batch.responses)]
        texts = batch.texts or [f"{p}\n{r}" for p, r in zip(batch.prompts, batch.responses)]
        payload = json.dumps({"model": self.name, "messages": texts, "conversations": conversations}).encode()
        last_fault = ""
        for attempt in range(self.retries + 1):
            try:
                scores = self._request(payload)
                return checked_scores(self.name, scores, len(batch.responses))
            except Refused as err:
                raise fail(f"reward server {self.url}: {err}; set reward_model to the server's final http(s) "
                           "URL") from None
            except urllib.error.HTTPError as err:
                last_fault = f"HTTP {err.code} {err.reason}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last_fault = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except ValueError as err:
                last_fault = str(err)
            except Exception as err:  # checked_scores raises RlhfkitError for wrong counts or values
                last_fault = str(err)
            if attempt < self.retries:
                delay = self.backoff * 2**attempt
                logger.warning("reward server %s: %s; retry %d/%d in %.1fs", self.url, last_fault,
                               attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise fail(f"reward server {self.url} failed after {self.retries} retries ({last_fault}); "
                   "check the server or raise reward_api_retries / reward_api_timeout")
