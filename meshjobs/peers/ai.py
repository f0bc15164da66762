"""AI persona peers: a persona file served as a meshjobs worker app of kind ``"ai"``.

::

    persona = load_persona("workers/personas/security-analysis.toml")
    peer = PersonaPeer(persona, resolve_api_key(persona, os.environ))
    worker = Worker(peer.app, identity, policy)        # or: meshjobs persona FILE
    ...
    await peer.aclose()

Each capability of the persona calls the model through the ``openai`` SDK
(``AsyncOpenAI`` pointed at the persona's ``base_url``: OpenAI, vLLM,
llama.cpp server, Ollama — configuration only) and returns, for the worker
to sign::

    {"output": <JSON valid under the result schema>,
     "model": <the model name the server reported>,
     "prompt_sha256": <SHA-256 of the exact messages sent>,
     "usage": {"prompt_tokens": .., "completion_tokens": .., "total_tokens": ..}}

Arguments are checked against the capability's JSON schema before the model
is asked (bad ones reach the submitter as invalid arguments, exit code 2).
Requests are bounded by a per-persona semaphore, time out per attempt, and are
retried with exponential backoff and full jitter on 408/409/429/5xx and
connection errors while the job's deadline allows (a server's ``Retry-After``
wins over the computed delay). An answer that is not JSON or breaks the result
schema is refused with :class:`ModelOutputError`, never passed on.

The API key is read once, kept out of every ``repr``, log line and error
message (server messages are scrubbed of it), and sent only to the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletion

from meshjobs import App, JobContext
from meshjobs.errors import InvalidArguments

from .persona import (
    CapabilitySpec,
    ModelError,
    ModelOutputError,
    ModelTimeout,
    Persona,
    PersonaError,
    build_messages,
    load_persona,
    parse_output,
    parse_persona,
    prompt_digest,
    with_endpoint,
)
from .schema import first_problem

__all__ = [
    "CapabilitySpec",
    "ModelError",
    "ModelOutputError",
    "ModelTimeout",
    "Persona",
    "PersonaError",
    "PersonaPeer",
    "load_persona",
    "parse_persona",
    "persona_app",
    "resolve_api_key",
    "with_endpoint",
]

log = logging.getLogger("meshjobs.peers.ai")

#: Sent as the key to servers that need none (the SDK insists on one).
NO_KEY = "meshjobs-no-key"
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
MAX_RETRY_AFTER = 60.0
#: Seconds between the model's timer and the job's, so that the one meant to fire does.
SLACK = 1.0
RETRY_STATUSES = frozenset({408, 409, 429})
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def resolve_api_key(persona: Persona, environ: Mapping[str, str]) -> str:
    """The API key from the variable the persona names, or :data:`NO_KEY` when it names none."""
    name = persona.endpoint.api_key_env
    if not name:
        return NO_KEY
    key = environ.get(name, "").strip()
    if not key:
        raise PersonaError(
            f"persona {persona.name!r}: endpoint.api_key_env: the environment variable {name} is not set "
            '(export it with the API key, or use api_key_env = "" for a local server that needs no key)'
        )
    return key


def persona_app(persona: Persona, environ: Mapping[str, str] | None = None) -> App:
    """The persona as an :class:`App` (kind ``"ai"``); the key comes from *environ* (default: os.environ).

    Use :class:`PersonaPeer` directly to close its HTTP connections when done.
    """
    return PersonaPeer(persona, resolve_api_key(persona, os.environ if environ is None else environ)).app


class PersonaPeer:
    """A persona, its model client and its concurrency bound; :attr:`app` is what a worker runs."""

    def __init__(self, persona: Persona, api_key: str) -> None:
        self.persona = persona
        self._api_key = api_key or NO_KEY
        self._client: openai.AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        endpoint = persona.endpoint
        host = urlsplit(endpoint.base_url).hostname or ""
        if endpoint.api_key_env and endpoint.base_url.startswith("http://") and host not in _LOOPBACK:
            log.warning("persona %s sends its API key over plain HTTP to %s", persona.name, host)
        self.app = App(persona.name, kind="ai", description=persona.description or f"AI persona {persona.name}")
        for cap in persona.capabilities:
            register = self.app.capability(cap.name, timeout=self.job_timeout(cap), description=cap.description,
                                           tags=cap.tags)  # fmt: skip
            register(self._handler(cap))

    def __repr__(self) -> str:
        endpoint = self.persona.endpoint
        return f"PersonaPeer({self.persona.name!r}, {endpoint.base_url}, model={endpoint.model!r})"

    def job_timeout(self, cap: CapabilitySpec) -> float:
        """Seconds a job may take: the capability's ``timeout``, or every attempt plus the backoff (and a second)."""
        if cap.timeout is not None:
            return cap.timeout
        endpoint = self.persona.endpoint
        attempts = endpoint.timeout * (endpoint.max_retries + 1)
        return min(3600.0, attempts + BACKOFF_CAP * endpoint.max_retries + SLACK)

    async def aclose(self) -> None:
        """Close the HTTP connections to the model endpoint."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- one job -----------------------------------------------------------

    async def run(self, cap: CapabilitySpec, args: dict[str, Any], job: JobContext | None = None) -> dict[str, Any]:
        """Ask the model for *cap* with *args*; the record the worker signs."""
        problem = first_problem(args, cap.arguments, "")
        if problem:
            where, message = problem[0].lstrip("."), problem[1]
            raise InvalidArguments(f"{where}: {message}" if where else message)
        loop = asyncio.get_running_loop()
        budget = self.job_timeout(cap)
        if job is not None:
            budget = min(budget, job.expires_at_ms / 1000 - time.time())
        messages = build_messages(self.persona, cap, args)
        digest = prompt_digest(messages)
        started = loop.time()
        completion = await self._complete(cap, messages, started + budget)
        choice = completion.choices[0] if completion.choices else None
        if choice is None:
            raise ModelOutputError("model output does not match the result schema: $: the server returned no choices")
        if choice.message.refusal:
            raise ModelOutputError(f"the model refused: {self._scrub(choice.message.refusal)[:300]}")
        output = parse_output(
            choice.message.content,
            cap.result,
            unwrap_fence=self.persona.endpoint.structured == "none",
            finish_reason=choice.finish_reason,
        )
        usage = completion.usage
        record = {
            "output": output,
            "model": completion.model or self.persona.endpoint.model,
            "prompt_sha256": digest,
            "usage": {
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
                "total_tokens": usage.total_tokens if usage else None,
            },
        }
        log.info(
            "persona %s %s job %s: %s answered in %.2f s, %s tokens",
            self.persona.name,
            cap.name,
            job.job_id if job else "-",
            record["model"],
            loop.time() - started,
            record["usage"]["total_tokens"],
        )
        return record

    def _state(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        """The client and semaphore of the running loop (both are bound to one loop)."""
        loop = asyncio.get_running_loop()
        # A new loop (a test, a second asyncio.run) gets its own; the old client
        # belongs to a closed loop and cannot be closed from this one.
        if self._client is None or self._slots is None or self._loop is not loop:
            endpoint = self.persona.endpoint
            # max_retries=0: retries are ours, bounded by the job's deadline.
            self._client = openai.AsyncOpenAI(
                base_url=endpoint.base_url, api_key=self._api_key, timeout=endpoint.timeout, max_retries=0
            )
            self._slots = asyncio.Semaphore(endpoint.concurrency)
            self._loop = loop
        return self._client, self._slots

    async def _complete(self, cap: CapabilitySpec, messages: list[dict[str, str]], deadline: float) -> ChatCompletion:
        endpoint = self.persona.endpoint
        loop = asyncio.get_running_loop()
        attempts = endpoint.max_retries + 1
        error: ModelError = ModelTimeout("the job's deadline passed before the model endpoint could be asked")
        tried = 0
        for attempt in range(1, attempts + 1):
            client, slots = self._state()
            retry_after: float | None = None
            async with slots:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # When the job's deadline comes first, the worker's own timer
                # ends the job (a timeout for the submitter): ours stays out of its way.
                limit = endpoint.timeout if endpoint.timeout < remaining else remaining + SLACK
                tried = attempt
                try:
                    async with asyncio.timeout(limit):
                        completion: ChatCompletion = await client.chat.completions.create(
                            **self._request(cap, messages), timeout=limit
                        )
                        return completion
                except (openai.APITimeoutError, TimeoutError):
                    error = ModelTimeout(f"the model endpoint did not answer within {limit:.3g} s")
                except openai.APIStatusError as exc:
                    error = ModelError(f"the model endpoint answered HTTP {exc.status_code}: {self._detail(exc)}")
                    if exc.status_code not in RETRY_STATUSES and exc.status_code < 500:
                        raise error from None
                    retry_after = _retry_after(exc.response.headers)
                except openai.APIConnectionError as exc:
                    error = ModelError(f"cannot reach the model endpoint: {self._scrub(str(exc))}")
            if attempt == attempts:
                break
            delay = retry_after if retry_after is not None else random.uniform(0, _backoff(attempt))
            if loop.time() + delay >= deadline:
                break
            log.info(
                "persona %s %s: attempt %d of %d failed (%s); retrying in %.2f s",
                self.persona.name,
                cap.name,
                attempt,
                attempts,
                error,
                delay,
            )
            await asyncio.sleep(delay)
        raise type(error)(f"{error} (gave up after {tried} attempt(s))")

    def _request(self, cap: CapabilitySpec, messages: list[dict[str, str]]) -> dict[str, Any]:
        endpoint = self.persona.endpoint
        request: dict[str, Any] = {
            "model": endpoint.model,
            "messages": messages,
            "temperature": endpoint.temperature,
        }
        if endpoint.max_tokens is not None:
            request["max_tokens"] = endpoint.max_tokens
        if endpoint.structured == "json_schema":
            name = cap.name.replace(".", "_")[:64]
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": cap.result, "strict": True},
            }
        elif endpoint.structured == "json_object":
            request["response_format"] = {"type": "json_object"}
        return request

    def _detail(self, exc: openai.APIStatusError) -> str:
        body = exc.body
        if isinstance(body, dict):
            inner = body.get("error", body)
            message = inner.get("message") if isinstance(inner, dict) else None
            if isinstance(message, str):
                return self._scrub(message)[:300]
        return self._scrub(exc.message)[:300]

    def _scrub(self, text: str) -> str:
        """*text* without the API key (servers quote keys back in their error messages)."""
        if self._api_key != NO_KEY and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text

    def _handler(self, cap: CapabilitySpec) -> Callable[..., Coroutine[Any, Any, dict[str, Any]]]:
        # The App validates arguments from type hints; these come as **kwargs
        # and are checked against the JSON schema in run().
        async def handler(_job: JobContext, **arguments: Any) -> dict[str, Any]:
            return await self.run(cap, arguments, _job)

        handler.__name__ = handler.__qualname__ = cap.name.replace(".", "_").replace("-", "_")
        handler.__doc__ = cap.description
        return handler


def _backoff(attempt: int) -> float:
    return float(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's wish (``retry-after-ms`` or ``retry-after`` in seconds), capped; None if it has none."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        text = headers.get(name)
        if text is None:
            continue
        try:
            seconds = float(text) * scale
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
        if seconds >= 0:
            return min(seconds, MAX_RETRY_AFTER)
    return None
