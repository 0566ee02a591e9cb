"""The routing policy as a pure function: (device, address) -> (verdict, real peer, rule)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vsproxy.policy import Allow, DeviceSpec, Policy, Remap, Service

A = DeviceSpec("a", 5)
B = DeviceSpec("b", 6)
C = DeviceSpec("c", 7, frozenset({"g"}))
D = DeviceSpec("d", 8, frozenset({"g"}))


def test_host_is_allowed_by_default_and_unknown_cids_have_no_route() -> None:
    p = Policy([A, B])
    r = p.outbound("a", 2, 80)
    assert (r.allowed, r.kind, r.cid, r.port, r.rule) == (True, "host", 2, 80, "default: host")
    r = p.outbound("a", 99, 80)
    assert (r.allowed, r.rule) == (False, "no route")
    assert not p.outbound("a", 5, 80).allowed  # itself


def test_siblings_are_denied_unless_grouped_remapped_or_allowed() -> None:
    p = Policy([A, B, C, D])
    assert not p.outbound("a", 6, 7000).allowed
    r = p.outbound("c", 8, 7000)
    assert (r.allowed, r.kind, r.device, r.rule) == (True, "device", "d", "group g")
    assert p.outbound("d", 7, 7000).allowed  # groups work both ways
    p2 = Policy([A, B], allows=[Allow("a", "out", 6), Allow("b", "in", 5, 7000)])
    assert p2.outbound("a", 6, 7000).allowed
    r = p2.outbound("a", 6, 7001)
    assert not r.allowed and r.rule == "not in b's inbound allowlist"


def test_explicit_outbound_list_replaces_the_default() -> None:
    p = Policy([A], allows=[Allow("a", "out", 2, 443)])
    assert p.outbound("a", 2, 443).allowed
    r = p.outbound("a", 2, 80)
    assert not r.allowed and r.rule == "not in a's outbound allowlist"


def test_remap_per_device_beats_global_and_port_rules_beat_cid_rules() -> None:
    p = Policy(
        [A, B, C],
        remaps=[Remap(3, 2), Remap(3, 6, device="a"), Remap(3, 7, port=9000, to_port=9001, device="a")],
    )
    assert p.outbound("b", 3, 80).cid == 2  # global
    r = p.outbound("a", 3, 80)
    assert (r.allowed, r.kind, r.cid, r.port) == (True, "device", 6, 80)  # own remap target is allowed
    r = p.outbound("a", 3, 9000)
    assert (r.cid, r.port, r.remap) == (7, 9001, "remap 3:9000=7:9001")


def test_service_at_exact_address_beats_remap() -> None:
    p = Policy([A], remaps=[Remap(3, 2)], services=[Service(3, 9000, "nitro-heartbeat")])
    r = p.outbound("a", 3, 9000)
    assert (r.kind, r.service, r.remap) == ("service", "nitro-heartbeat", None)
    assert p.outbound("a", 3, 9001).kind == "host"


def test_a_remap_target_accepts_from_the_remapping_device_only() -> None:
    p = Policy([A, B, C], remaps=[Remap(3, 7, device="a")])
    assert p.outbound("a", 3, 1).allowed
    assert not p.outbound("b", 7, 1).allowed
    assert p.inbound("c", 5, 1).allowed and not p.inbound("c", 6, 1).allowed


def test_guest_view_reverses_cid_remaps() -> None:
    p = Policy([A, B], remaps=[Remap(3, 6, device="a"), Remap(3, 2)])
    assert p.guest_view("a", 6) == (3, "remap 3=6")
    assert p.guest_view("b", 2) == (3, "remap 3=2")
    assert p.guest_view("b", 5) == (5, None)


cids = st.sampled_from([2, 3, 5, 6, 7, 8, 42])
devices = [DeviceSpec("a", 5), DeviceSpec("b", 6, frozenset({"x"})), DeviceSpec("c", 7, frozenset({"x"})),
           DeviceSpec("d", 8)]
remaps = st.lists(st.builds(Remap, cids, cids, st.none(), st.none(), st.sampled_from([None, "a", "b", "c", "d"])),
                  max_size=4)
allows = st.lists(st.builds(Allow, st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(["out", "in"]), cids,
                            st.sampled_from([None, 80])), max_size=4)


@given(remaps, allows, st.sampled_from(["a", "b", "c", "d"]), cids, st.sampled_from([80, 81]))
def test_a_device_reached_is_one_the_rules_let_in(rs: list[Remap], als: list[Allow], dev: str, cid: int,
                                                   port: int) -> None:
    """Whatever the rules: a connection reaching a sibling passed both allowlists."""
    p = Policy(devices, rs, [], als)
    r = p.outbound(dev, cid, port)
    if r.allowed and r.kind == "device":
        assert r.device is not None and r.device != dev
        src = p.device(dev)
        assert p.inbound(r.device, src.cid, r.port).allowed
        out_explicit = [a for a in als if a.device == dev and a.direction == "out"]
        if out_explicit:
            assert any(a.cid == r.cid and a.port in (None, r.port) for a in out_explicit)


@given(st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(["a", "b", "c", "d"]), cids, st.sampled_from([80, 81]))
def test_an_unrelated_pair_is_always_denied(dev: str, other: str, cid: int, port: int) -> None:
    """a and d share no group, remap or allow rule: nothing from a reaches d, however dialled."""
    p = Policy(devices, [Remap(3, 6, device="b")], [], [Allow("b", "out", 8)])
    r = p.outbound("a", cid, port)
    assert not (r.allowed and r.device == "d")


@given(remaps, st.sampled_from(["a", "b", "c", "d"]), cids)
def test_remap_is_invisible_the_guest_view_dials_back_to_the_same_peer(rs: list[Remap], dev: str, real: int) -> None:
    """If a guest sees a peer at real CID R as X, dialling X from that guest reaches R."""
    p = Policy(devices, rs)
    seen, rule = p.guest_view(dev, real)
    if rule is not None:
        assert p.outbound(dev, seen, 80).cid == real


def test_guest_view_does_not_alias_a_cid_the_device_maps_elsewhere() -> None:
    p = Policy(devices, [Remap(3, 6), Remap(3, 7, device="a")])
    assert p.guest_view("a", 6) == (6, None)  # for a, 3 means 7: 6 keeps its own CID
    assert p.guest_view("a", 7) == (3, "remap 3=7")
    assert p.guest_view("d", 6) == (3, "remap 3=6")


def test_a_forward_cid_device_sends_every_cid_to_the_host_unless_a_rule_asks_for_the_sibling() -> None:
    """vhost-device-vsock's forward-cid backend forwards every CID (its sibling routing is for
    unix-backend devices): so does vsproxy, unless a remap, a shared group or an allow-out entry
    asks for the sibling."""
    fwd = DeviceSpec("fwd", 5, forward_any=True)
    p = Policy([fwd, B, C])
    for cid in (3, 6, 7, 99):  # a CID no device has, and two siblings nothing asks for
        r = p.outbound("fwd", cid, 9000)
        assert (r.allowed, r.kind, r.cid, r.port, r.rule) == (True, "host", cid, 9000, "default: forward-cid")
    grouped = Policy([DeviceSpec("fwd", 5, frozenset({"g"}), forward_any=True), C])
    r = grouped.outbound("fwd", 7, 9000)
    assert (r.allowed, r.kind, r.device) == (True, "device", "c")
    remapped = Policy([fwd, B], remaps=[Remap(3, 6, device="fwd")])
    r = remapped.outbound("fwd", 3, 9000)
    assert (r.allowed, r.kind, r.device, r.cid) == (True, "device", "b", 6)
    listed = Policy([fwd, B], allows=[Allow("fwd", "out", 6), Allow("fwd", "out", 2)])
    assert listed.outbound("fwd", 6, 9000).kind == "device"
    r = listed.outbound("fwd", 7, 9000)  # not a device, not in the list
    assert (r.allowed, r.kind) == (False, "host")
    assert not p.outbound("fwd", 5, 9000).allowed  # itself
