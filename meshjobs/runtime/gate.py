"""Flood control at the worker: junk is dropped cheaply, senders are rate-limited, logs are sampled.

A worker answers every refusal with a signed rejection, which costs a
signature and a publish; a flood of junk must not buy that at will. So:

- refusals share one budget (a token bucket); beyond it the message is
  dropped unanswered, before any crypto when the frame's claimed signer is
  not even trusted;
- each verified submitter has its own token bucket, so one key cannot crowd
  out the others (refused as ``overloaded``, which clients retry);
- log lines about refusals are sampled: the first of each reason, then one
  summary per interval with how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """*rate* tokens per second, at most *burst* saved up."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.tokens < 0:
            self.tokens = self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SampledLog:
    """Logs the first event of each kind, then at most one summary per *interval_s* seconds."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += f" (and {suppressed} more like it in the last {self.interval_s:g} s)"
        self.logger.warning(message, *args)


class Gate:
    """Per-sender and refusal budgets of one worker."""

    def __init__(
        self,
        *,
        sender_rate: float,
        sender_burst: float,
        refusal_rate: float,
        refusal_burst: float,
        max_senders: int = 10_000,
    ) -> None:
        self.sender_rate = sender_rate
        self.sender_burst = sender_burst
        self.refusals = TokenBucket(refusal_rate, refusal_burst)
        self.max_senders = max_senders
        self._senders: OrderedDict[str, TokenBucket] = OrderedDict()
        self.dropped = 0

    def allow_refusal(self) -> bool:
        """May this refusal be signed and sent? If not, it is dropped (and counted)."""
        if self.refusals.take():
            return True
        self.dropped += 1
        return False

    def allow_sender(self, key: str) -> bool:
        """Take one token from *key*'s bucket (a verified submitter)."""
        bucket = self._senders.get(key)
        if bucket is None:
            bucket = self._senders[key] = TokenBucket(self.sender_rate, self.sender_burst)
            if len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(key)
        return bucket.take()
