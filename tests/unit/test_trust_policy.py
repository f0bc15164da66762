"""Trust file sections for reputation: trust services, pre-trusted keys, whose results a submitter accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshjobs.errors import PolicyFileError, Reason, Rejected
from meshjobs.identity import Identity
from meshjobs.trust.policy import TrustPolicy, parse_trust

SERVICE, ANCHOR, WORKER, OTHER = (Identity.generate().public_key for _ in range(4))


def parse(text: str) -> TrustPolicy:
    return parse_trust(text, Path("trust.toml"))


def test_services_anchors_and_accepted_results_are_read() -> None:
    policy = parse(
        f'[[trust_service]]\nkey = "{SERVICE}"\nname = "hub"\n[[pretrusted]]\nkey = "{ANCHOR}"\n'
        f'[[accept]]\nkey = "{WORKER}"\n[[accept]]\ncommunity = "lab"\n'
    )
    assert policy.trust_services == {SERVICE} and policy.pretrusted == {ANCHOR}
    assert policy.accept_workers == {WORKER} and policy.accept_communities == {"lab"}
    assert policy.names[SERVICE] == "hub" and not policy.keys  # none of them may submit
    # with_key (a worker's own key) keeps every section.
    assert policy.with_key(OTHER).trust_services == {SERVICE} and policy.with_key(OTHER).accept_workers == {WORKER}


def test_accepting_results_by_worker_or_community() -> None:
    anyone = parse("")
    assert not anyone.restricts_results and anyone.accepts_result(OTHER)
    policy = parse(f'[[accept]]\nkey = "{WORKER}"\n[[accept]]\ncommunity = "lab"\n')
    assert policy.accepts_result(WORKER) and policy.accepts_result(OTHER, "lab")
    assert not policy.accepts_result(OTHER) and not policy.accepts_result(OTHER, "garage")
    with pytest.raises(Rejected) as refused:
        policy.check_result(OTHER, "garage")
    assert refused.value.reason == Reason.UNTRUSTED and "garage" in refused.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f'[[accept]]\nkey = "{WORKER}"\ncommunity = "lab"\n', "exactly one of"),
        ("[[accept]]\nname = 'x'\n", "exactly one of"),
        ("[[accept]]\ncommunity = 'Lab!'\n", "community name"),
        ("[[trust_service]]\nkey = 'UNOTAKEY'\n", "key 'UNOTAKEY'"),
        (f'[[pretrusted]]\nkey = "{ANCHOR}"\ncapabilities = ["x"]\n', "unknown field 'capabilities'"),
        ("[[trust_services]]\nkey = 'x'\n", "unknown section 'trust_services'"),
    ],
)
def test_mistakes_are_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyFileError, match=message):
        parse(text)
