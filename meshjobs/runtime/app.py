"""The worker app object: capabilities register here, explicitly, Celery style.

::

    app = App("demo")

    @app.capability("demo.add", deterministic=True)
    def add(a: int, b: int) -> int:
        return a + b

Arguments are validated from the function's type hints with pydantic before
the handler runs; a parameter annotated :class:`JobContext` receives the job's
context instead of an argument. Sync functions run in a thread, async ones on
the event loop. Nothing happens at import time beyond building the registry.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import to_jsonable_python

from meshjobs.compare import EXACT, spec_of
from meshjobs.errors import InvalidArguments, UsageError
from meshjobs.subjects import check_capability
from meshjobs.workflow.approval import Approval, as_approval

PeerKind = Literal["system", "ai", "human", "hybrid"]
PEER_KINDS: tuple[str, ...] = ("system", "ai", "human", "hybrid")
DEFAULT_TIMEOUT = 60.0
_TAG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class JobContext:
    """What a handler may know about the job it runs. Declare a parameter of this type to get it."""

    job_id: str
    capability: str
    submitter: str
    worker: str
    expires_at_ms: int


@dataclass
class Capability:
    """One registered capability: its name, handler and options."""

    name: str
    func: Callable[..., Any]
    timeout: float
    deterministic: bool
    description: str
    args_model: type[BaseModel]
    context_param: str | None
    is_async: bool
    accepts_extra: bool = False
    tags: tuple[str, ...] = ()
    """Specialties (``security``, ``docs``, ...) shown in discovery; ``--tag`` routes by them."""
    idempotent: bool = False
    """Running it twice does no harm: a replayed envelope is refused per worker only, not claimed mesh-wide."""
    approval: Approval | None = None
    """Who must approve each job before the handler runs (None: nobody; see :mod:`meshjobs.workflow.approval`)."""
    compare: str = EXACT
    """When two results count as the same in a check (see :mod:`meshjobs.compare`); canonical text."""

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validate *args* against the signature. Raises :class:`InvalidArguments`."""
        try:
            model = self.args_model.model_validate(args)
        except ValidationError as exc:
            raise InvalidArguments(_describe_validation(exc)) from None
        values = dict(model)
        if self.accepts_extra and model.model_extra:
            values.update(model.model_extra)
        return values

    async def call(self, kwargs: dict[str, Any], context: JobContext) -> Any:
        """Run the handler (sync ones in a thread) and return a JSON-ready value."""
        if self.context_param:
            kwargs = {**kwargs, self.context_param: context}
        if self.is_async:
            value = await self.func(**kwargs)
        else:
            value = await asyncio.to_thread(self.func, **kwargs)
        return to_jsonable_python(value)


def _describe_validation(exc: ValidationError) -> str:
    # One line per argument: a union (int | float) reports once, not per member.
    seen: dict[str, str] = {}
    for error in exc.errors():
        where = str(error["loc"][0]) if error["loc"] else "arguments"
        if where not in seen:
            seen[where] = "unexpected argument" if error["type"] == "extra_forbidden" else error["msg"]
    return "; ".join(f"{where}: {message}" for where, message in list(seen.items())[:5])


def _optional_of(annotation: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``), else None."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in get_args(annotation) else None


def _args_model(name: str, func: Callable[..., Any]) -> tuple[type[BaseModel], str | None, bool]:
    signature = inspect.signature(func)
    try:
        hints = get_type_hints(func)
    except Exception as exc:  # noqa: BLE001 - any failure to resolve hints is a registration error
        raise UsageError(f"capability {name!r}: cannot resolve type hints: {exc}") from exc
    fields: dict[str, Any] = {}
    context_param = None
    accepts_extra = False
    for param in signature.parameters.values():
        annotation = hints.get(param.name, Any)
        if annotation is JobContext or _optional_of(annotation) is JobContext:
            context_param = param.name
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise UsageError(f"capability {name!r}: *{param.name} is not supported; arguments are passed by name")
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_extra = True
            continue
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise UsageError(f"capability {name!r}: positional-only parameter {param.name!r} is not supported")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, default)
    config = ConfigDict(extra="allow" if accepts_extra else "forbid")
    model = create_model(f"{name}.args", __config__=config, **fields)
    return model, context_param, accepts_extra


@dataclass
class App:
    """A set of capabilities plus how the worker running them describes itself.

    ``name`` is for display; ``kind`` says what sort of peer answers (a
    system, an AI persona, a human, or a hybrid of AI and human).
    """

    name: str
    kind: PeerKind = "system"
    description: str = ""
    capabilities: dict[str, Capability] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _LABEL_RE.fullmatch(self.name):
            raise UsageError(f"app name {self.name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
        if self.kind not in PEER_KINDS:
            raise UsageError(f"kind must be one of {', '.join(PEER_KINDS)}, not {self.kind!r}")

    def capability(
        self,
        name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        deterministic: bool = False,
        idempotent: bool = False,
        description: str | None = None,
        tags: tuple[str, ...] | list[str] = (),
        approval: Approval | bool | None = None,
        approvers: tuple[str, ...] | list[str] = (),
        compare: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as *name*. The function is returned unchanged.

        ``compare="rel=1e-9"`` (see :mod:`meshjobs.compare`) says when two
        results count as the same, for a capability that is not bit-for-bit
        deterministic; it makes the capability checkable, as
        ``deterministic=True`` does.

        ``approval=Approval(...)`` (or ``approvers=[keys]``, or ``approval=True``
        for any operator of the worker's trust policy) gates every job on a
        signed approval before the handler runs.
        """
        check_capability(name)
        try:
            gate = as_approval(approval, approvers)
        except UsageError as exc:
            raise UsageError(f"capability {name!r}: {exc}") from None
        if not timeout > 0:
            raise UsageError(f"capability {name!r}: timeout must be positive")
        try:
            comparison = spec_of(compare)
        except UsageError as exc:
            raise UsageError(f"capability {name!r}: {exc}") from None
        bad = [t for t in tags if not _TAG_RE.fullmatch(t)]
        if bad:
            raise UsageError(f"capability {name!r}: tag {bad[0]!r} must be 1-32 of a-z, 0-9, '-'")

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            if name in self.capabilities:
                raise UsageError(f"capability {name!r} is registered twice")
            model, context_param, accepts_extra = _args_model(name, func)
            doc = description if description is not None else inspect.getdoc(func) or ""
            self.capabilities[name] = Capability(
                name=name,
                func=func,
                timeout=float(timeout),
                deterministic=deterministic or comparison != EXACT,
                idempotent=idempotent,
                tags=tuple(sorted(set(tags))),
                approval=gate,
                description=doc.splitlines()[0] if doc else "",
                args_model=model,
                context_param=context_param,
                is_async=inspect.iscoroutinefunction(func),
                accepts_extra=accepts_extra,
                compare=comparison,
            )
            return func

        return register
