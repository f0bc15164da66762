"""AI persona files: the validated model, loading, and the pure prompt and output steps.

A persona is a TOML file (see ``workers/personas/``)::

    version = 1
    name = "security-analyst"
    description = "Finds security problems in code and designs"
    system_prompt = "You are a senior application security engineer..."

    [endpoint]
    base_url = "http://127.0.0.1:11434/v1"   # any OpenAI-compatible server
    model = "llama3.1"
    api_key_env = ""                          # the NAME of the variable holding the key; "" = no key

    [[capability]]
    name = "analyse.security"
    description = "Threat-model a piece of code or a design"
    tags = ["security"]
    arguments = { type = "object", properties = { code = { type = "string" } }, required = ["code"] }
    result = { type = "object", ... }

The API key itself is never in the file: only the name of the environment
variable that holds it. Everything here is network-free; :mod:`.ai` runs it.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meshjobs import App
from meshjobs._files import describe_errors, parse_toml, read_local_text
from meshjobs.envelope import loads_strict
from meshjobs.errors import HandlerError, UsageError

from .schema import SchemaError, check_schema, first_problem, strict_problem

PERSONA_VERSION = 1
MAX_PERSONA_BYTES = 256 * 1024
MAX_OUTPUT_CHARS = 512 * 1024
_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_TAG = re.compile(r"[a-z][a-z0-9-]{0,23}")
_ARGUMENT = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_FENCE = re.compile(r"\A```[a-zA-Z]*\s*\n(.*)\n```\s*\Z", re.DOTALL)

StrictStr = Annotated[str, Field(strict=True)]
Seconds = Annotated[float, Field(strict=True, gt=0, le=3600)]


class PersonaError(UsageError):
    """A persona file cannot be read or does not follow the format, or its API key is not set."""


class ModelError(HandlerError):
    """The model endpoint failed: refused the request, or kept failing until retries ran out."""


class ModelTimeout(ModelError):
    """The model endpoint did not answer in time."""


class ModelOutputError(ModelError):
    """The model answered, but not with JSON matching the capability's result schema."""


# -- the model --------------------------------------------------------------


class Endpoint(BaseModel):
    """Where and how to reach the model: any server speaking OpenAI's chat completions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: StrictStr
    model: Annotated[str, Field(strict=True, min_length=1, max_length=256)]
    api_key_env: StrictStr
    """Name of the environment variable holding the API key; ``""`` for servers that need none."""
    timeout: Seconds = 60.0
    """Seconds one request may take."""
    max_retries: Annotated[int, Field(strict=True, ge=0, le=10)] = 2
    concurrency: Annotated[int, Field(strict=True, ge=1, le=256)] = 4
    temperature: Annotated[float, Field(strict=True, ge=0, le=2)] = 0.2
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=1_000_000)] | None = None
    structured: Literal["json_schema", "json_object", "none"] = "json_schema"
    """How to ask for JSON: a strict JSON schema (OpenAI, vLLM, llama.cpp, Ollama >= 0.5),
    JSON mode only, or nothing (the schema is in the prompt either way)."""

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL, like http://127.0.0.1:11434/v1")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials: name the key's variable in api_key_env")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        # Never echo the value: a key pasted here by mistake must not reach a log.
        if value and not _ENV_NAME.fullmatch(value):
            raise ValueError('must be the NAME of an environment variable (like OPENAI_API_KEY), or "" for none')
        return value


class CapabilitySpec(BaseModel):
    """One capability of the persona: its name, JSON-schema arguments and result, and prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: StrictStr
    description: Annotated[str, Field(strict=True, min_length=1, max_length=300)]
    tags: Annotated[tuple[StrictStr, ...], Field(max_length=16)] = ()
    arguments: dict[str, Any]
    result: dict[str, Any]
    prompt: Annotated[str, Field(strict=True, min_length=1, max_length=32_000)] | None = None
    """A ``string.Template`` for the user message: ``$name`` for an argument, ``$arguments`` for all as JSON."""
    timeout: Seconds | None = None
    """Seconds the whole job may take, retries included (default: from the endpoint's settings)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            App("check").capability(value)  # the runtime's own name rules, nothing registered
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tag in value:
            if not _TAG.fullmatch(tag):
                raise ValueError(f"{tag!r} is not a tag: lower-case letters, digits and '-', up to 24")
        if len(set(value)) != len(value):
            raise ValueError("tags repeat")
        return value

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_root(value)
        for name in value.get("properties", {}):
            if not _ARGUMENT.fullmatch(name):
                raise ValueError(f"{name!r} cannot be an argument name: a letter, then letters, digits, '_' or '-'")
        return value

    @field_validator("result")
    @classmethod
    def _result(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_root(value)
        return value

    @model_validator(mode="after")
    def _template(self) -> CapabilitySpec:
        if self.prompt is None:
            return self
        template = string.Template(self.prompt)
        if not template.is_valid():
            raise ValueError("prompt: invalid $ placeholder (write $$ for a literal $)")
        known = set(self.arguments.get("properties", {})) | {"arguments"}
        unknown = [name for name in template.get_identifiers() if name not in known]
        if unknown:
            raise ValueError(f"prompt: ${unknown[0]} is not an argument (known: {', '.join(sorted(known))})")
        return self

    @property
    def argument_names(self) -> tuple[str, ...]:
        return tuple(self.arguments.get("properties", {}))


def _check_root(schema: dict[str, Any]) -> None:
    try:
        check_schema(schema, "")
    except SchemaError as exc:
        raise ValueError(str(exc)) from None
    if schema.get("type") != "object":
        raise ValueError('the top level must be type = "object"')


class Persona(BaseModel):
    """A persona file, validated. Unknown fields anywhere are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1]
    name: StrictStr
    description: Annotated[str, Field(strict=True, max_length=500)] = ""
    endpoint: Endpoint
    system_prompt: Annotated[str, Field(strict=True, min_length=1, max_length=32_000)]
    capabilities: Annotated[tuple[CapabilitySpec, ...], Field(alias="capability", min_length=1, max_length=64)]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _LABEL.fullmatch(value):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Persona:
        names = [cap.name for cap in self.capabilities]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"capability {name!r} is defined twice")
        if self.endpoint.structured == "json_schema":
            for cap in self.capabilities:
                problem = strict_problem(cap.result, f"capability {cap.name!r} result")
                if problem:
                    raise ValueError(f'{problem} (or set endpoint.structured = "json_object")')
        return self


# -- loading ----------------------------------------------------------------


def load_persona(path: str | Path) -> Persona:
    """Read and validate a persona file. Raises :class:`PersonaError` naming the file and the field."""
    path = Path(path)
    text = read_local_text(path, what="persona file", max_bytes=MAX_PERSONA_BYTES, error=PersonaError)
    return parse_persona(text, str(path))


def parse_persona(text: str, source: str = "<persona>") -> Persona:
    """Parse persona TOML. *source* names it in errors."""
    return parse_toml(text, Persona, source, PersonaError)


def with_endpoint(persona: Persona, source: str = "<persona>", **changes: Any) -> Persona:
    """*persona* with some ``[endpoint]`` settings replaced (None leaves one as it is), validated again."""
    updates = {key: value for key, value in changes.items() if value is not None}
    if not updates:
        return persona
    raw = persona.model_dump(by_alias=True)
    raw["endpoint"] = {**raw["endpoint"], **updates}
    try:
        return Persona.model_validate(raw)
    except ValidationError as exc:
        raise PersonaError(f"{source}: {describe_errors(exc)}") from None


# -- prompts and outputs ----------------------------------------------------


def output_instructions(cap: CapabilitySpec) -> str:
    """What the system message says about the answer's shape (for every structured mode)."""
    schema = json.dumps(cap.result, indent=2, sort_keys=True, ensure_ascii=False)
    return (
        "Answer with a single JSON object and nothing else (no prose, no code fences). "
        f"It must match this JSON schema:\n```json\n{schema}\n```"
    )


def render_prompt(cap: CapabilitySpec, args: dict[str, Any]) -> str:
    """The user message: the capability's template filled in, or the task and its arguments as JSON."""
    everything = json.dumps(args, indent=2, sort_keys=True, ensure_ascii=False)
    if cap.prompt is None:
        return f"Task ({cap.name}): {cap.description}\n\nArguments:\n```json\n{everything}\n```"
    values = dict.fromkeys(cap.argument_names, "")
    for name, value in args.items():
        values[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    values["arguments"] = everything
    return string.Template(cap.prompt).substitute(values)


def build_messages(persona: Persona, cap: CapabilitySpec, args: dict[str, Any]) -> list[dict[str, str]]:
    """The exact messages sent: the persona's system prompt (plus the output schema), then the task.

    The submitter's arguments only ever go into the user message.
    """
    system = f"{persona.system_prompt.strip()}\n\n{output_instructions(cap)}"
    return [{"role": "system", "content": system}, {"role": "user", "content": render_prompt(cap, args)}]


def prompt_digest(messages: list[dict[str, str]]) -> str:
    """SHA-256 (hex) of the messages as canonical JSON: sorted keys, no spaces, UTF-8."""
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_output(
    content: str | None, schema: dict[str, Any], *, unwrap_fence: bool = False, finish_reason: str | None = None
) -> Any:
    """The model's answer as validated JSON, or :class:`ModelOutputError` saying where it breaks the schema.

    *unwrap_fence* accepts an answer wrapped in one Markdown code fence (for
    servers asked without any structured-output mode, whose models like fences).
    """
    prefix = "model output does not match the result schema"
    text = (content or "").strip()
    if len(text) > MAX_OUTPUT_CHARS:
        raise ModelOutputError(f"{prefix}: $: longer than {MAX_OUTPUT_CHARS} characters")
    if unwrap_fence and (fenced := _FENCE.match(text)):
        text = fenced.group(1).strip()
    if not text:
        raise ModelOutputError(f"{prefix}: $: the answer is empty")
    try:
        value = loads_strict(text)
    except ValueError as exc:
        cut = " (the answer was cut off at max_tokens)" if finish_reason == "length" else ""
        raise ModelOutputError(f"{prefix}: $: not JSON ({exc}){cut}") from None
    problem = first_problem(value, schema)
    if problem:
        raise ModelOutputError(f"{prefix}: {problem[0]}: {problem[1]}")
    return value
