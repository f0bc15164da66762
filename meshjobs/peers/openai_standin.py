"""A small, deterministic stand-in for an OpenAI-compatible chat completions server.

It speaks just enough of the protocol for AI persona peers to run without a
model: ``POST /v1/chat/completions`` and ``GET /v1/models``, over real HTTP on
a loopback port. Answers are generated from the JSON schema the request asks
for (``response_format`` ``json_schema``, or a fenced ```json block in the
system message for ``json_object`` and plain requests): objects get every
property, strings a short text derived from the prompt, numbers their minimum
or 0, arrays their minimum number of items (at least one), enums their first
value. Token usage counts words. Standard library only: tests, ``meshjobs
demo`` and ``python -m meshjobs.peers.openai_standin`` use it alike::

    with OpenAIStandin() as server:          # 127.0.0.1, a free port
        print(server.url)                    # http://127.0.0.1:PORT/v1

Faults for tests are chosen, first match wins, by the ``X-Standin-Fault``
header, by a marker like ``[standin-fault:slow:3]`` anywhere in the last user
message (so one persona can be driven into each fault through its arguments),
or by the model name (``"slow:3"``):

=======================  ==================================================
``malformed``            200 with content that is not JSON
``schema-violation``     200 with JSON that breaks the requested schema
``slow[:S]``             sleeps S seconds (default 5) before a good answer
``rate-limit-then-ok[:N]``  429 for the first N requests (default 1) with the
                         same messages, then a good answer
``server-error``         500, always
=======================  ==================================================
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

FAULTS = ("malformed", "schema-violation", "slow", "rate-limit-then-ok", "server-error")
FAULT_HEADER = "X-Standin-Fault"
DEFAULT_MODEL = "standin"
MAX_BODY = 4 * 1024 * 1024
_SCHEMA_BLOCK = re.compile(r"```json\s*\n(.*?)\n```", re.DOTALL)
_WORD = re.compile(r"\S+")
_MARKER = re.compile(r"\[standin-fault:([a-z-]+(?::[0-9.]+)?)\]")


@dataclass
class StandinStats:
    """What the server saw; read it under :attr:`OpenAIStandin.lock`."""

    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    by_mode: Counter[str] = field(default_factory=Counter)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    """The last 100 request bodies, oldest first."""


@dataclass(frozen=True)
class Fault:
    mode: str
    amount: float | None = None


def parse_fault(text: str | None) -> Fault | None:
    """``"slow:2"`` -> Fault("slow", 2.0); anything that names no fault -> None."""
    if not text:
        return None
    mode, _, amount = text.strip().partition(":")
    if mode not in FAULTS:
        return None
    try:
        return Fault(mode, float(amount) if amount else None)
    except ValueError:
        return Fault(mode)


# -- answers from schemas ---------------------------------------------------


def _words(text: str) -> int:
    return len(_WORD.findall(text))


def _text_for(seed: str, where: str) -> str:
    return f"{where or 'answer'} (standin {hashlib.sha256(f'{seed}|{where}'.encode()).hexdigest()[:8]})"


def instance_for(schema: Any, seed: str, where: str = "") -> Any:
    """A small instance valid under *schema* (the subset meshjobs personas use), deterministic in *seed*."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: instance_for(sub, seed, name) for name, sub in properties.items()}
    if kind == "array":
        count = max(1, int(schema.get("minItems", 1)))
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [instance_for(schema.get("items", {}), seed, f"{where}[{i}]") for i in range(count)]
    if kind in ("number", "integer"):
        low, high = schema.get("minimum"), schema.get("maximum")
        value = low if low is not None else (0 if high is None or high >= 0 else high)
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    text = _text_for(seed, where)
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    if len(text) < low:
        text += "." * (low - len(text))
    return text[: int(high)] if high is not None else text


def violation_for(schema: Any, seed: str) -> Any:
    """JSON that breaks *schema*: its first property gets a value of the wrong type."""
    value = instance_for(schema, seed)
    if isinstance(value, dict) and value:
        first = next(iter(value))
        wrong_type = (schema.get("properties") or {}).get(first, {}).get("type")
        value[first] = ["not", "a", "string"] if wrong_type == "string" else "not the declared type"
        return value
    return {"unexpected": value}


def _schema_from_prompt(messages: list[Any]) -> Any:
    """The last fenced ```json block of the system messages, if it parses."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            blocks = _SCHEMA_BLOCK.findall(str(message.get("content", "")))
            for block in reversed(blocks):
                try:
                    return json.loads(block)
                except ValueError:
                    continue
    return None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


# -- the HTTP side ----------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "meshjobs-openai-standin"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: tests read the stats, not stderr

    def setup(self) -> None:
        super().setup()
        self.server.standin._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._track(self.connection, add=False)

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._error(404, f"no route {self.path}", "not_found")
            return
        models = [DEFAULT_MODEL, *FAULTS]
        self._json(200, {"object": "list", "data": [_model_entry(m) for m in models]})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found")
            return
        standin = self.server.standin
        if not self._authorised(standin.api_key):
            return
        body = self._read_body()
        if body is None:
            return
        with standin.enter(body, self._fault(body)) as fault:
            self._answer(standin, body, fault)

    def _authorised(self, key: str | None) -> bool:
        if key is None or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        # Like OpenAI's 401, but never echoing what was sent.
        self._error(401, "Incorrect API key provided.", "invalid_api_key")
        return False

    def _read_body(self) -> dict[str, Any] | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self._error(400, "a JSON body with Content-Length is required", "invalid_request_error")
            self.close_connection = True
            return None
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            self._error(400, "the body is not JSON", "invalid_request_error")
            return None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body.get("model"):
            self._error(400, "'model' and 'messages' are required", "invalid_request_error")
            return None
        if body.get("stream"):
            self._error(400, "the stand-in does not stream", "invalid_request_error")
            return None
        return body

    def _fault(self, body: dict[str, Any]) -> Fault | None:
        users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        marker = _MARKER.search(_content_text(users[-1].get("content"))) if users else None
        return (
            parse_fault(self.headers.get(FAULT_HEADER))
            or parse_fault(marker.group(1) if marker else None)
            or parse_fault(str(body["model"]))
        )

    def _answer(self, standin: OpenAIStandin, body: dict[str, Any], fault: Fault | None) -> None:
        messages: list[Any] = body["messages"]
        prompt = "\n".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict))
        mode = fault.mode if fault else "ok"
        if mode == "server-error":
            self._error(500, "the stand-in was asked to fail", "server_error")
            return
        if mode == "rate-limit-then-ok" and standin._count_rate_limit(prompt, int((fault and fault.amount) or 1)):
            self._error(429, "Rate limit reached (stand-in).", "rate_limit_exceeded", {"retry-after-ms": "20"})
            return
        if mode == "slow" and standin._stopping.wait((fault and fault.amount) or 5.0):
            return  # shutting down: drop the request
        schema = _requested_schema(body.get("response_format"), messages)
        if mode == "malformed":
            content = "Sure! Here is my review: {the design looks fine"
        elif schema is None:
            content = f"Stand-in answer: {_text_for(prompt, 'text')}"
        elif mode == "schema-violation":
            content = json.dumps(violation_for(schema, prompt))
        else:
            content = json.dumps(instance_for(schema, prompt))
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        prompt_tokens, completion_tokens = _words(prompt), _words(content)
        self._json(
            200,
            {
                "id": f"chatcmpl-{digest[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(body["model"]),
                "system_fingerprint": "meshjobs-standin",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _error(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        self._json(status, body, headers)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(value).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, text in (headers or {}).items():
                self.send_header(name, text)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (a timeout): nothing to answer


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "meshjobs-standin"}


def _requested_schema(response_format: Any, messages: list[Any]) -> Any:
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return spec["schema"]
    return _schema_from_prompt(messages)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # stop() joins them: no thread outlives the stand-in
    block_on_close = True
    standin: OpenAIStandin


class OpenAIStandin:
    """The stand-in server: :meth:`start`, :attr:`url`, :meth:`stop`, or use it as a context manager.

    *api_key*, when given, is required as ``Authorization: Bearer <key>``
    (a wrong or missing key gets OpenAI's 401), so tests can check it is sent.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.lock = threading.Lock()
        self.stats = StandinStats()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._rate_limited: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"OpenAIStandin({self.url if self._server else 'stopped'})"

    @property
    def url(self) -> str:
        """The base URL clients use, ending in ``/v1``."""
        if self._server is None:
            raise RuntimeError("the stand-in is not running")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> OpenAIStandin:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        server.standin = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="openai-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end slow answers and idle keep-alive connections, join every thread."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()  # joins the request threads
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> OpenAIStandin:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def reset_stats(self) -> None:
        with self.lock:
            self.stats = StandinStats()
            self._rate_limited.clear()

    # -- used by the handler threads --------------------------------------

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self.lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _count_rate_limit(self, prompt: str, limit: int) -> bool:
        """True while the same prompt has been refused fewer than *limit* times."""
        key = hashlib.sha256(prompt.encode()).hexdigest()
        with self.lock:
            if self._rate_limited[key] >= limit:
                return False
            self._rate_limited[key] += 1
            return True

    def enter(self, body: dict[str, Any], fault: Fault | None) -> _InFlight:
        return _InFlight(self, body, fault)


class _InFlight:
    """Counts a request as in flight (for concurrency assertions) while it is answered."""

    def __init__(self, standin: OpenAIStandin, body: dict[str, Any], fault: Fault | None) -> None:
        self.standin, self.body, self.fault = standin, body, fault

    def __enter__(self) -> Fault | None:
        with self.standin.lock:
            stats = self.standin.stats
            stats.requests += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            stats.by_mode[self.fault.mode if self.fault else "ok"] += 1
            stats.bodies = [*stats.bodies[-99:], self.body]
        return self.fault

    def __exit__(self, *exc: object) -> None:
        with self.standin.lock:
            self.standin.stats.in_flight -= 1


def main(argv: list[str] | None = None) -> None:
    """``python -m meshjobs.peers.openai_standin --port N``: serve until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description="A deterministic OpenAI-compatible stand-in server.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    options = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with OpenAIStandin(options.host, options.port) as server:
        print(f"OpenAI-compatible stand-in listening on {server.url}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
