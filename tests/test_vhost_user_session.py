"""vhost-user codec and session as transcripts: bytes in, actions out."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from vsproxy.vhost_user import codec
from vsproxy.vhost_user.codec import Message, MessageReader, ProtocolError, Request, VringAddr
from vsproxy.vhost_user.session import (
    BACKEND_PROTOCOL_FEATURES,
    Action,
    Reply,
    Session,
    SetMemTable,
    SetVringFd,
    StartRing,
    StopRing,
    default_features,
)

U64 = struct.Struct("<Q")
REPLY_ACK = 1 << codec.ProtocolFeature.REPLY_ACK


def msg(req: int, payload: bytes = b"", need_reply: bool = False) -> Message:
    raw = codec.encode(req, payload, need_reply=need_reply)
    reader = MessageReader()
    got = reader.feed(raw, [])
    assert got is not None
    return got[0]


def reply_payload(actions: Sequence[object]) -> bytes:
    replies = [a for a in actions if isinstance(a, Reply)]
    assert len(replies) == 1
    _req, flags, _size = codec.HEADER.unpack_from(replies[0].data)
    assert flags & codec.FLAG_REPLY
    return replies[0].data[codec.HEADER_SIZE :]


def negotiated(reply_ack: bool = True) -> Session:
    s = Session(guest_cid=5)
    s.handle(msg(Request.SET_FEATURES, U64.pack(default_features())), [])
    s.handle(msg(Request.SET_PROTOCOL_FEATURES, U64.pack(BACKEND_PROTOCOL_FEATURES if reply_ack else 0)), [])
    return s


def setup_ring(s: Session, index: int, num: int = 128) -> list[Action]:
    out: list[Action] = []
    out += s.handle(msg(Request.SET_VRING_NUM, codec.encode_vring_state(index, num)), [])
    out += s.handle(msg(Request.SET_VRING_BASE, codec.encode_vring_state(index, 0)), [])
    addr = VringAddr(index, 0, 0x1000, 0x3000, 0x2000, 0)
    out += s.handle(msg(Request.SET_VRING_ADDR, codec.encode_vring_addr(addr)), [])
    out += s.handle(msg(Request.SET_VRING_KICK, U64.pack(index)), [100 + index])
    return out


def test_get_features_offers_what_qemu_needs_and_is_answered_any_time() -> None:
    s = negotiated()
    for _ in range(2):
        (features,) = U64.unpack(reply_payload(s.handle(msg(Request.GET_FEATURES), [])))
        for bit in (codec.VIRTIO_F_VERSION_1, codec.VHOST_USER_F_PROTOCOL_FEATURES, codec.VIRTIO_RING_F_EVENT_IDX,
                    codec.VIRTIO_RING_F_INDIRECT_DESC):
            assert features & (1 << bit)


def test_protocol_features_include_config_reply_ack_mq_and_queue_num_is_two() -> None:
    s = Session(guest_cid=5)
    (pf,) = U64.unpack(reply_payload(s.handle(msg(Request.GET_PROTOCOL_FEATURES), [])))
    for bit in (codec.ProtocolFeature.CONFIG, codec.ProtocolFeature.REPLY_ACK, codec.ProtocolFeature.MQ):
        assert pf & (1 << bit)
    assert U64.unpack(reply_payload(s.handle(msg(Request.GET_QUEUE_NUM), [])))[0] == 2


def test_get_config_returns_guest_cid_as_le64_after_config_header() -> None:
    s = Session(guest_cid=0x1234)
    payload = reply_payload(s.handle(msg(Request.GET_CONFIG, codec.encode_config(0, b"\0" * 8)), []))
    assert payload == struct.pack("<III", 0, 8, 0) + (0x1234).to_bytes(8, "little")


def test_get_config_beyond_config_space_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        Session(guest_cid=5).handle(msg(Request.GET_CONFIG, codec.encode_config(4, b"\0" * 8)), [])


def test_every_need_reply_message_gets_an_ack_like_qemu10_set_vring_enable() -> None:
    s = negotiated()
    setup_ring(s, 0)
    acts = s.handle(msg(Request.SET_VRING_CALL, U64.pack(0), need_reply=True), [7])
    assert U64.unpack(reply_payload(acts))[0] == 0
    # no memory yet: enabling does not start, but is still acked
    acts = s.handle(msg(Request.SET_VRING_ENABLE, codec.encode_vring_state(0, 1), need_reply=True), [])
    assert U64.unpack(reply_payload(acts))[0] == 0
    acts = s.handle(msg(Request.SET_VRING_ENABLE, codec.encode_vring_state(0, 0), need_reply=True), [])
    assert U64.unpack(reply_payload(acts))[0] == 0


def test_ring_starts_only_when_memory_kick_and_enable_are_all_there() -> None:
    s = negotiated()
    table = codec.encode_mem_table([codec.MemRegion(0, 1 << 20, 0x7F0000000000, 0)])
    acts = s.handle(msg(Request.SET_MEM_TABLE, table, need_reply=True), [42])
    assert isinstance(acts[0], SetMemTable) and acts[0].fds == [42]
    assert U64.unpack(reply_payload(acts))[0] == 0
    acts = setup_ring(s, 1)
    assert not any(isinstance(a, StartRing) for a in acts)  # PROTOCOL_FEATURES: starts disabled
    assert any(isinstance(a, SetVringFd) and a.kind == "kick" and a.fd == 101 for a in acts)
    acts = s.handle(msg(Request.SET_VRING_ENABLE, codec.encode_vring_state(1, 1)), [])
    assert acts == [StartRing(1)]
    acts = s.handle(msg(Request.GET_VRING_BASE, codec.encode_vring_state(1, 0)), [])
    assert acts == [StopRing(1, reply=True)]
    assert s.reply_vring_base(1, 77)[codec.HEADER_SIZE :] == codec.encode_vring_state(1, 77)


def test_without_protocol_features_a_ring_is_enabled_by_its_kick() -> None:
    s = Session(guest_cid=5)
    s.handle(msg(Request.SET_FEATURES, U64.pack(1 << codec.VIRTIO_RING_F_EVENT_IDX)), [])
    table = codec.encode_mem_table([codec.MemRegion(0, 1 << 20, 0, 0)])
    s.handle(msg(Request.SET_MEM_TABLE, table), [42])
    acts = setup_ring(s, 0)
    assert StartRing(0) in acts


@pytest.mark.parametrize("num", [0, 3, 100, 65536])
def test_ring_size_not_a_power_of_two_ends_the_session(num: int) -> None:
    with pytest.raises(ProtocolError):
        negotiated().handle(msg(Request.SET_VRING_NUM, codec.encode_vring_state(0, num)), [])


def test_ring_above_the_queue_size_limit_is_refused_and_the_limit_itself_is_taken() -> None:
    s = Session(guest_cid=5, max_queue_size=256)  # vhost-device-vsock's --queue-size 256
    s.handle(msg(Request.SET_FEATURES, U64.pack(default_features())), [])
    with pytest.raises(ProtocolError, match="vring 1 size 512 is above this device's queue-size 256"):
        s.handle(msg(Request.SET_VRING_NUM, codec.encode_vring_state(1, 512)), [])
    assert s.vrings[1].num == 0
    s.handle(msg(Request.SET_VRING_NUM, codec.encode_vring_state(1, 256)), [])
    assert s.vrings[1].num == 256


@pytest.mark.parametrize(
    ("req", "payload", "fds"),
    [
        (Request.SET_FEATURES, b"\0" * 4, []),  # size mismatch
        (Request.SET_FEATURES, U64.pack(1 << 50), []),  # never offered
        (Request.SET_VRING_NUM, codec.encode_vring_state(2, 128), []),  # event queue is QEMU's
        (Request.SET_VRING_KICK, U64.pack(0), []),  # fd promised, none given
        (Request.SET_VRING_CALL, U64.pack(0x100), [9]),  # "no fd" flag but an fd came
        (Request.SET_OWNER, b"", [9]),  # fds where none belong
        (Request.SET_MEM_TABLE, codec.encode_mem_table([codec.MemRegion(0, 4096, 0, 0)]), []),  # fd count
        (Request.SET_MEM_TABLE, struct.pack("<II", 9, 0) + b"\0" * 288, [1] * 9),  # too many regions
        (Request.SET_MEM_TABLE, codec.encode_mem_table([codec.MemRegion(0, 0, 0, 0)]), [3]),  # empty region
        (
            Request.SET_MEM_TABLE,
            codec.encode_mem_table([codec.MemRegion(0, 8192, 0, 0), codec.MemRegion(4096, 8192, 1 << 30, 0)]),
            [3, 4],
        ),  # overlapping guest ranges
        (Request.SET_VRING_BASE, codec.encode_vring_state(0, 1 << 16), []),
        (Request.SET_VRING_ENDIAN, codec.encode_vring_state(0, 0), []),
        (999, b"", []),
    ],
)
def test_bad_front_end_messages_raise_protocol_error(req: int, payload: bytes, fds: list[int]) -> None:
    with pytest.raises(ProtocolError):
        negotiated().handle(msg(req, payload), fds)


def test_reader_reassembles_messages_split_anywhere_and_keeps_their_fds() -> None:
    raw = codec.encode(Request.SET_VRING_KICK, U64.pack(1))
    reader = MessageReader()
    assert reader.wanted() == 12
    assert reader.feed(raw[:5], [33]) is None
    assert reader.wanted() == 7
    assert reader.feed(raw[5:12], []) is None
    assert reader.wanted() == 8
    got = reader.feed(raw[12:], [])
    assert got is not None
    m, fds = got
    assert (m.request, m.payload, fds) == (Request.SET_VRING_KICK, U64.pack(1), [33])
    assert reader.wanted() == 12


def test_reader_rejects_bad_version_and_oversized_payload() -> None:
    with pytest.raises(ProtocolError):
        MessageReader().feed(struct.pack("<III", 1, 0x2, 0), [])
    with pytest.raises(ProtocolError):
        MessageReader().feed(struct.pack("<III", 1, 0x1, 1 << 20), [])


def test_get_vring_base_without_a_running_ring_still_replies() -> None:
    s = negotiated()
    acts = s.handle(msg(Request.GET_VRING_BASE, codec.encode_vring_state(0, 0)), [])
    assert acts == [StopRing(0, reply=True)]


def test_request_with_reply_flag_is_a_protocol_error() -> None:
    m = Message(Request.GET_FEATURES, codec.VERSION | codec.FLAG_REPLY, b"")
    with pytest.raises(ProtocolError):
        Session(guest_cid=5).handle(m, [])
