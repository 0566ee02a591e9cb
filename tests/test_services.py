"""Built-in services are a registry: a new kind is one class and one registration."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from vsproxy.endpoints import services
from vsproxy.endpoints.services import SERVICES, Service, ServicePeer, register


@pytest.fixture
def upper() -> Iterator[type[Service]]:
    class Upper(Service):
        kind = "test-upper"

        def answer(self, data: bytes) -> bytes:
            return data.upper()

    register(Upper)
    yield Upper
    del SERVICES["test-upper"]


def run(fn: Callable[[], None]) -> None:
    fn()


def peer(kind: str) -> ServicePeer:
    return ServicePeer(kind, run, lambda: None, lambda: None)


def test_a_registered_kind_answers_through_the_same_peer_as_the_built_in_ones(upper: type[Service]) -> None:
    p = peer("test-upper")
    assert p.send([b"hello ", memoryview(b"world")]) == 11
    buf = bytearray(32)
    n = p.recv_into([memoryview(buf)[:4], memoryview(buf)[4:]])
    assert bytes(buf[:n]) == b"HELLO WORLD"
    assert "test-upper" in services.service_kinds()


def test_the_built_in_kinds_answer_as_documented() -> None:
    hb, echo, discard = peer("nitro-heartbeat"), peer("echo"), peer("discard")
    for p in (hb, echo, discard):
        p.send([b"\xb7x\xb7"])
    out = bytearray(8)
    assert hb.recv_into([memoryview(out)]) == 2 and bytes(out[:2]) == b"\xb7\xb7"
    assert echo.recv_into([memoryview(out)]) == 3 and bytes(out[:3]) == b"\xb7x\xb7"
    assert discard.recv_into([memoryview(out)]) is None


def test_a_service_whose_answers_are_not_read_takes_no_more_but_discard_takes_everything() -> None:
    echo, discard = peer("echo"), peer("discard")
    big = b"a" * (services.PENDING_MAX + 100)
    assert echo.send([big]) == services.PENDING_MAX and echo.send([b"more"]) == 0
    assert discard.send([big]) == len(big)


def test_a_kind_cannot_be_registered_twice_or_be_unknown() -> None:
    class Again(Service):
        kind = "echo"

    with pytest.raises(ValueError, match="twice"):
        register(Again)
    with pytest.raises(ValueError, match="unknown service"):
        peer("no-such-kind")
