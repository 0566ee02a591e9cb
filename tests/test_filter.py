"""The packet filter language (vsproxy/filter/, docs/filter.md): fields, operators, precedence,
missing-header behaviour, compile-time errors with their columns, and hypothesis properties."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vsproxy.filter as vf
import vsproxy.filter.lexer as vf_lexer
from vsproxy.capture.view import PacketView
from vsproxy.filter import FIELDS, FieldType, Filter, FilterError, compile_filter
from vsproxy.vsock import header as H

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "filter.md")


def hdr(**kw: int) -> H.Header:
    base = dict(src_cid=3, dst_cid=2, src_port=1024, dst_port=9000, len=16, type=1, op=int(H.Op.RW), flags=0,
                buf_alloc=65536, fwd_cnt=100)  # fmt: skip
    base.update(kw)
    return H.Header(**base)


def pkt(header: H.Header | None = None, no_hdr: bool = False, **kw: object) -> PacketView:
    p = PacketView(time=1700000000.5, device="enclave1", from_guest=True, hdr=None if no_hdr else header or hdr(),
                   mon_op=4, payload=b"GET / HTTP/1.1\r\n\r\n", comment=None, proto="http",
                   app=("GET / HTTP/1.1", "Host: x"))  # fmt: skip
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def m(text: str, p: PacketView | None = None) -> bool:
    return compile_filter(text)(p if p is not None else pkt())


# --- API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_or_blank_filter_matches_every_packet(text: str) -> None:
    f = compile_filter(text)
    assert f.matches_all
    assert f(pkt()) is True and f(pkt(no_hdr=True)) is True
    assert f.text == text


def test_filter_keeps_its_text_and_exposes_a_bare_predicate() -> None:
    f = compile_filter("op == rw")
    assert isinstance(f, Filter) and f.text == "op == rw" and not f.matches_all
    assert f.predicate(pkt()) is True and f.predicate(pkt(hdr(op=1))) is False
    assert f == compile_filter("op == rw") and f != compile_filter("op == rst")


def test_judging_a_packet_never_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    f = compile_filter('op == rw and payload contains "GET" and app matches "^GET"')

    def no_parsing(text: str) -> list[object]:
        raise AssertionError("tokenized while judging a packet")

    monkeypatch.setattr(vf_lexer, "tokenize", no_parsing)  # the compiler calls it as lexer.tokenize
    assert f(pkt()) is True


def test_the_package_never_evaluates_text_as_python() -> None:
    modules = [vf] + [importlib.import_module(f"vsproxy.filter.{m.name}") for m in pkgutil.iter_modules(vf.__path__)]
    assert vf_lexer in modules and len(modules) > 2  # every module of the package, not just __init__
    for module in modules:
        assert not re.search(r"(?<![\w.])(eval|exec|compile)\(", inspect.getsource(module)), module.__name__


# --- precedence and logic -----------------------------------------------------------------------

REWRITTEN_REQUEST = pkt(hdr(op=int(H.Op.REQUEST)), comment="rewritten: real peer 7")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rewritten or op == rw and port == 1", True),  # and binds tighter than or
        ("(rewritten or op == rw) and port == 1", False),
        ("not rewritten or rewritten", True),  # not binds tighter than or
        ("not (rewritten or rewritten)", False),
        ("not rewritten and rewritten", False),  # not binds tighter than and
        ("not (rewritten and op == rw)", True),
        ("! rewritten || rewritten", True),
        ("!(rewritten || rewritten)", False),
        ("rewritten && op == request", True),
        ("not not rewritten", True),
        ("op == rw or op == rst or op == shutdown or op == request", True),  # n-ary or
        ("rewritten and cid == 3 and port == 9000 and op == request and dir == from_guest", True),  # n-ary and
        ("rewritten and cid == 3 and port == 9000 and op == request and dir == to_guest", False),
        ("((((rewritten))))", True),
        ("OP == REQUEST AND NOT Rewritten == FALSE", True),  # keywords, fields and names: any case
    ],
)
def test_precedence_is_not_then_and_then_or(text: str, expected: bool) -> None:
    assert m(text, REWRITTEN_REQUEST) is expected


# --- fields -------------------------------------------------------------------------------------

FIELD_CASES = [
    ("src.cid == 3", True), ("src.cid == 2", False), ("dst.cid == host", True), ("dst.cid == 3", False),
    ("cid == 3", True), ("cid == 2", True), ("cid == 4", False),
    ("src.port == 1024", True), ("dst.port == 9000", True), ("dst.port == 1024", False),
    ("port == 1024", True), ("port == 9000", True), ("port == 80", False),
    ("op == rw", True), ("type == stream", True), ("type == seqpacket", False),
    ("flags == 0", True), ("len == 16", True), ("buf_alloc == 65536", True), ("fwd_cnt == 100", True),
    ("mon_op == payload", True), ("mon_op == 4", True), ("mon_op == control", False),
    ("time > 1700000000.25", True), ("time < 1700000000.75", True), ("time == 1700000000", False),
    ("device == enclave1", True), ('device == "enclave1"', True), ("device == Enclave1", False),
    ("dir == from_guest", True), ("dir == to_guest", False), ("dir == FROM_GUEST", True),
    ("verdict == allowed", True), ("verdict == denied", False),
    ("rewritten", False), ("rewritten == false", True), ("rewritten == 0", True),
    ("proto == http", True), ("proto == HTTP", True), ("proto == tls", False), ("proto", True),
    ('payload contains "GET"', True), ('payload == "GET"', False),
    ('comment == ""', True), ("comment", False),
    ('app contains "Host"', True), ('app == "Host: x"', True), ('app == "Host"', False), ("app", True),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), FIELD_CASES)
def test_each_field_compares_against_its_packet_value(text: str, expected: bool) -> None:
    assert m(text) is expected


def test_every_field_in_the_table_is_exercised_and_documented() -> None:
    used = {re.split(r"[\s=<>!]", text)[0] for text, _ in FIELD_CASES}
    assert used == set(FIELDS)
    with open(DOCS) as f:
        documented = set(re.findall(r"^\| `([a-z_.]+)` \| (\w+) \|", f.read(), re.M))
    assert documented == {(name, info.type.value) for name, info in FIELDS.items()}


def test_field_table_describes_types_names_and_header_origin() -> None:
    assert FIELDS["op"].type is FieldType.NUMBER and FIELDS["op"].names["credit_request"] == 7
    assert FIELDS["cid"].header and not FIELDS["device"].header
    assert FIELDS["verdict"].choices == ("allowed", "denied", "spoofed", "refused")
    assert FIELDS["payload"].type is FieldType.BYTES and FIELDS["app"].type is FieldType.STRINGS
    assert all(info.description for info in FIELDS.values())
    with pytest.raises(TypeError):
        FIELDS["op"].names["bogus"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("comment", "verdict", "rewritten"),
    [(None, "allowed", False), ("denied by policy", "denied", False), ("spoofed src cid 9", "spoofed", False),
     ("rewritten: real peer 7", "allowed", True)],
)  # fmt: skip
def test_verdict_and_rewritten_come_from_the_capture_comment(
    comment: str | None, verdict: str, rewritten: bool
) -> None:
    p = pkt(comment=comment)
    assert m(f"verdict == {verdict}", p)
    assert m("verdict", p) is (verdict != "allowed")
    assert m("rewritten", p) is rewritten
    assert m("verdict in {denied, spoofed}", p) is (verdict != "allowed")


@pytest.mark.parametrize(
    ("from_guest", "word"), [(True, "from_guest"), (False, "to_guest"), (None, "unknown")]
)  # fmt: skip
def test_direction_names_cover_unknown(from_guest: bool | None, word: str) -> None:
    p = pkt(from_guest=from_guest)
    assert m(f"dir == {word}", p)
    assert m("dir", p) is (from_guest is not None)
    others = {"from_guest", "to_guest", "unknown"} - {word}
    assert not any(m(f"dir == {o}", p) for o in others)


def test_unknown_protocol_is_none_and_a_bare_proto_means_known() -> None:
    unknown = pkt(proto=None)
    assert m("proto == none", unknown) and not m("proto", unknown)
    assert m("proto != http", unknown)  # "none" is a value, not a missing field
    assert m("proto in {http, none}", unknown) and m("proto in {http, none}")
    assert not m("proto == none") and m("proto")


def test_app_means_any_summary_and_not_equal_means_none_does() -> None:
    assert m('app contains "GET"') and m('app matches "^Host"')
    assert not m('app != "Host: x"') and m('app != "Other"')
    empty = pkt(app=())
    assert not m('app contains ""', empty) and not m("app", empty) and m('app != "x"', empty)


def test_comment_and_device_compare_exactly() -> None:
    p = pkt(comment="denied by Policy", device="vm-1.a")
    assert m('comment contains "Policy"', p) and not m('comment contains "policy"', p)
    assert m('comment matches r"^denied"', p)
    assert m("device == vm-1.a", p) and m("device in {vm-2, vm-1.a}", p)
    assert m("device", p) and not m("device", pkt(device=""))


# --- operators ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [4, 5, 6])
@pytest.mark.parametrize(
    ("symbol", "word", "python"),
    [("==", "eq", lambda a, b: a == b), ("!=", "ne", lambda a, b: a != b), ("<", "lt", lambda a, b: a < b),
     ("<=", "le", lambda a, b: a <= b), (">", "gt", lambda a, b: a > b), (">=", "ge", lambda a, b: a >= b)],
)  # fmt: skip
def test_comparison_symbols_and_words_agree_with_python(
    length: int, symbol: str, word: str, python: Callable[[int, int], bool]
) -> None:
    p = pkt(hdr(len=length))
    assert m(f"len {symbol} 5", p) is python(length, 5)
    assert m(f"len {word.upper()} 0x5", p) is python(length, 5)
    assert m(f"len{symbol}5", p) is python(length, 5)


def test_set_membership_mixes_names_and_numbers_and_allows_a_trailing_comma() -> None:
    assert m("op in {request, 5, 0x7,}")
    assert not m("op in {rst, shutdown}")
    assert m("op not in {rst, shutdown}") and not m("op not in {rw}")
    assert m("port in {80, 9000}") and not m("port not in {80, 9000}")
    assert m('device in {"enclave1"}') and m("rewritten in {false}")


def test_either_side_fields_match_when_one_side_does_and_differ_when_neither_does() -> None:
    p = pkt(hdr(src_cid=5, dst_cid=2, src_port=1024, dst_port=9000))
    assert m("cid == 5", p) and m("cid == 2", p) and not m("cid == 7", p)
    assert not m("cid != 5", p) and m("cid != 7", p)
    assert m("port > 8999", p) and m("port < 1025", p) and not m("port > 9000", p)
    assert m("not cid == 5", p) == m("cid != 5", p)


PAYLOAD = b'GET /\x00\xb7\n\r\t\\"\xff\xc3\xa9'


@pytest.mark.parametrize(
    "needle",
    ['"GET"', r'"\x00\xb7"', r'"\n\r\t\\\""', r'"\xff"', '"é"', r'"\xc3\xa9"', "47:45:54", "00:b7", "0x474554",
     "0xb7", "0XFF", '"/\\x00"'],
)  # fmt: skip
def test_payload_contains_accepts_strings_with_escapes_and_hex_bytes(needle: str) -> None:
    assert m(f"payload contains {needle}", pkt(payload=PAYLOAD))
    assert not m(f"payload contains {needle}", pkt(payload=b"nothing here"))


def test_a_payload_string_from_undecodable_argv_bytes_means_those_bytes() -> None:
    # sys.argv holds a non-UTF-8 byte as a surrogateescape character
    assert m('payload contains "\udcff\udcfe"', pkt(payload=b"x\xff\xfey"))


def test_payload_equality_and_truth() -> None:
    assert m("payload == 0xb7", pkt(payload=b"\xb7")) and m('payload == "\\xb7"', pkt(payload=b"\xb7"))
    assert m("payload != b7:b7", pkt(payload=b"\xb7"))
    assert m("payload", pkt(payload=b"x")) and not m("payload", pkt(payload=b""))
    assert m("payload in {0xb7, 0xb8}", pkt(payload=b"\xb8"))


def test_matches_searches_with_python_regular_expressions() -> None:
    assert m(r'payload matches r"^GET /\x00"', pkt(payload=PAYLOAD))  # re's own \x00 escape, kept raw
    assert m(r'payload matches "^GET /\x00"', pkt(payload=PAYLOAD))  # the filter's escape: a NUL byte
    assert m('payload matches r"HTTP/1\\.[01]"') and not m('payload matches "^HTTP"')
    assert m('proto matches "^HT"')  # proto is case-insensitive, so its regex is too
    assert not m('device matches "^ENC"') and m('device matches "(?i)^ENC"')
    assert m('payload matches "[[a]"', pkt(payload=b"a"))  # re's "possible nested set" warning is not raised


# --- names and numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [*range(8), 99])
def test_op_names_and_numbers_are_equivalent(value: int) -> None:
    p = pkt(hdr(op=value))
    for op in H.Op:
        expected = value == op
        assert m(f"op == {op.name.lower()}", p) is expected
        assert m(f"op == {op.name}", p) is expected
        assert m(f'op == "{op.name.lower()}"', p) is expected
        assert m(f"op == {int(op)}", p) is expected
        assert m(f"op == {int(op):#x}", p) is expected


@pytest.mark.parametrize(("field", "names"), [("type", {"stream": 1, "seqpacket": 2}),
                                              ("src.cid", {"hypervisor": 0, "local": 1, "host": 2, "any": 2**32 - 1}),
                                              ("mon_op", {"connect": 1, "disconnect": 2, "control": 3})])  # fmt: skip
def test_value_names_equal_their_numbers(field: str, names: dict[str, int]) -> None:
    for name, number in names.items():
        p = pkt(hdr(type=number, src_cid=number), mon_op=number)
        assert m(f"{field} == {name}", p) and m(f"{field} == {number}", p)
        assert not m(f"{field} != {name}", p)


# --- packets without a virtio header ----------------------------------------------------------------

HEADER_FIELDS = [name for name, info in FIELDS.items() if info.header]


@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_a_packet_without_header_matches_no_header_comparison_and_not_matches(field: str) -> None:
    bare = pkt(no_hdr=True)
    for text in (f"{field} == 0", f"{field} != 0", f"{field} >= 0", f"{field} < 0", f"{field} in {{0, 1}}",
                 f"{field} not in {{0, 1}}", field):  # fmt: skip
        assert m(text, bare) is False, text
        assert m(f"not {text}", bare) is True, text
        assert m(f"!({text})", bare) is True, text


def test_a_packet_without_header_still_matches_its_other_fields() -> None:
    bare = pkt(no_hdr=True, mon_op=3)
    assert m("mon_op == control and device == enclave1 and not op == rw", bare)
    assert m('op == rw or payload contains "GET"', bare)


# --- errors ---------------------------------------------------------------------------------------

ERRORS = [
    # (filter, part of the message, column, token)
    ("src.cdi == 3", "unknown field 'src.cdi'", 0, "src.cdi"),
    ("op == rw and bogus", "unknown field 'bogus'", 13, "bogus"),
    ("op == foo", "unknown op name 'foo'", 6, "foo"),
    ("cid == abc", "unknown cid name 'abc'", 7, "abc"),
    ("port == http", "'port' takes a number, not 'http'", 8, "http"),
    ('port == "80"', "'port' takes a number", 8, '"80"'),
    ("cid == 1.5", "'cid' takes a whole number", 7, "1.5"),
    ("verdict == denid", "unknown verdict 'denid'", 11, "denid"),
    ("dir in {from_guest, sideways}", "unknown dir 'sideways'", 20, "sideways"),
    ("device < 3", "'<' does not apply to string field 'device'", 7, "<"),
    ("payload ge 0x01", "'ge' does not apply to bytes field 'payload'", 8, "ge"),
    ("rewritten > 0", "'>' does not apply to bool field 'rewritten'", 10, ">"),
    ("cid contains 3", "'contains' does not apply to number field 'cid'", 4, "contains"),
    ('op matches "r"', "'matches' does not apply to number field 'op'", 3, "matches"),
    ("rewritten == maybe", "'rewritten' is true or false", 13, "maybe"),
    ("payload contains GET", "'payload' takes a quoted string or hex bytes", 17, "GET"),
    ("payload contains 474554", "'payload' takes a quoted string or hex bytes", 17, "474554"),
    ("payload contains 0x474", "odd number of hex digits", 17, "0x474"),
    ("device == 5", "'device' takes a word or a quoted string", 10, "5"),
    ('payload contains "GET', "unterminated string", 17, '"GET'),
    ('payload contains r"GET\\"', "unterminated string", 17, 'r"GET\\"'),
    ('payload contains "\\d"', "bad escape '\\d'", 18, "\\d"),
    ('payload contains "a\\x4g"', "bad escape '\\x'", 19, "\\x"),
    ('payload contains "a\ud800"', "string holds a character that is not valid text", 19, "\ud800"),
    ('payload matches "("', "bad regular expression", 16, '"("'),
    ('app matches "' + "a" * 1025 + '"', "regular expression longer than 1024", 12, '"' + "a" * 1025 + '"'),
    ("payload matches GET", "'matches' takes a quoted regular expression", 16, "GET"),
    ("payload matches", "expected a quoted regular expression after 'matches', found end of filter", 15, ""),
    ("op ==", "expected a value after '==', found end of filter", 5, ""),
    ("op == and", "expected a value after '==', found 'and'", 6, "and"),
    ("op == )", "expected a value after '==', found ')'", 6, ")"),
    ("op == rw and", "expected a field name or '(', found end of filter", 12, ""),
    ("and op == rw", "expected a field name or '(', found 'and'", 0, "and"),
    ("not", "expected a field name or '(', found end of filter", 3, ""),
    ('"GET"', "expected a field name or '(', found '\"GET\"'", 0, '"GET"'),
    ("op == rw rst", "unexpected 'rst' after a complete expression", 9, "rst"),
    ("op == rw port == 1", "unexpected 'port' after a complete expression", 9, "port"),
    ("(op == rw", "unclosed '('", 0, "("),
    ("(op == rw rst)", "expected 'and', 'or' or ')', found 'rst'", 10, "rst"),
    ("op == rw)", "unmatched ')'", 8, ")"),
    ("()", "expected a field name or '(', found ')'", 1, ")"),
    ("cid = 3", "unexpected character '=' ('=' is not an operator: use '==')", 4, "="),
    ("cid == 3 & port == 1", "unexpected character '&' (use '&&' or 'and')", 9, "&"),
    ("device == 'x'", "unexpected character ''' (strings use double quotes)", 10, "'"),
    ("port == 12ab", "bad number '12ab'", 8, "12ab"),
    ("time > 1.2.3", "bad number '1.2.3'", 7, "1.2.3"),
    ("port == " + "9" * 5000, "number too long", 8, "9" * 5000),
    ("op in {}", "empty set", 7, "}"),
    ("op in rw", "expected '{' after 'in', found 'rw'", 6, "rw"),
    ("op in {rw rst}", "expected ',' or '}', found 'rst'", 10, "rst"),
    ("op in {rw,", "expected a value after 'in', found end of filter", 10, ""),
    ("op in {rw", "unclosed '{'", 6, "{"),
    ("op not rw", "unexpected 'not' after a complete expression", 3, "not"),
    ("(" * 65 + "rewritten" + ")" * 65, "nested more than 64 deep", 64, "("),
    ("not " * 65 + "rewritten", "nested more than 64 deep", 256, "not"),
]


@pytest.mark.parametrize(("text", "message", "column", "token"), ERRORS)
def test_bad_filters_raise_filter_error_at_the_bad_token(text: str, message: str, column: int, token: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(text)
    e = info.value
    assert message in e.message
    assert (e.column, e.token, e.text) == (column, token, text)
    assert text[e.column : e.column + len(e.token)] == e.token
    assert str(e) == f"{e.message} (column {column})"


def test_error_renders_the_filter_and_carets_under_the_token() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter("src.cdi == 3")
    assert info.value.render() == "src.cdi == 3\n^^^^^^^"
    with pytest.raises(FilterError) as info:
        compile_filter("op == rw and\tbogus\n")
    assert info.value.render() == "op == rw and bogus \n             ^^^^^"
    with pytest.raises(FilterError) as info:
        compile_filter("op ==")
    assert info.value.render() == "op ==\n     ^"  # end of filter: one caret past the end
    assert isinstance(info.value, ValueError)


def test_nesting_up_to_the_limit_compiles() -> None:
    assert m("(" * 64 + "op == rw" + ")" * 64)
    assert m("not " * 64 + "op == rw")  # an even number of nots


def test_a_long_flat_expression_compiles_and_runs_without_recursion() -> None:
    text = " or ".join(f"port == {n}" for n in range(7000, 9001))
    assert m(text) and not m(text, pkt(hdr(src_port=1, dst_port=2)))
    text = " and ".join("op == rw" for _ in range(2000))
    assert m(text)


# --- properties -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Atom:
    text: str
    judge: Callable[[PacketView], bool]


def _h(p: PacketView) -> H.Header:
    assert p.hdr is not None
    return p.hdr


def atoms() -> st.SearchStrategy[Atom]:
    """Filter comparisons with a reference implementation in plain Python."""
    cid = st.sampled_from([2, 3, 5])
    port = st.sampled_from([80, 1024, 9000])
    op = st.sampled_from(list(H.Op))
    word = st.sampled_from(["GET", "POST", "\xb7", "HTTP"])
    return st.one_of(
        cid.map(lambda c: Atom(f"cid == {c}", lambda p: p.hdr is not None and c in (p.hdr.src_cid, p.hdr.dst_cid))),
        cid.map(lambda c: Atom(f"cid != {c}", lambda p: p.hdr is not None and c not in (p.hdr.src_cid, p.hdr.dst_cid))),
        port.map(lambda n: Atom(f"dst.port >= {n}", lambda p: p.hdr is not None and p.hdr.dst_port >= n)),
        port.map(lambda n: Atom(f"src.port lt {n:#x}", lambda p: p.hdr is not None and p.hdr.src_port < n)),
        op.map(lambda o: Atom(f"op == {o.name.lower()}", lambda p: p.hdr is not None and p.hdr.op == o)),
        st.sets(op, min_size=1).map(lambda os: Atom("op in {" + ", ".join(o.name for o in os) + "}",
                                                   lambda p: p.hdr is not None and p.hdr.op in os)),
        word.map(lambda w: Atom(f'payload contains "{w}"'.replace("\xb7", "\\xb7"),
                                lambda p: w.encode("latin-1") in p.payload)),
        st.just(Atom("rewritten", lambda p: (p.comment or "").startswith("rewritten"))),
        st.just(Atom("verdict == denied", lambda p: (p.comment or "").startswith("denied"))),
        st.just(Atom("payload", lambda p: bool(p.payload))),
        st.just(Atom("proto", lambda p: p.proto is not None)),
        st.just(Atom("dir == to_guest", lambda p: p.from_guest is False)),
        st.just(Atom("flags", lambda p: p.hdr is not None and p.hdr.flags != 0)),
        st.just(Atom('app matches "^GET"', lambda p: any(a.startswith("GET") for a in p.app))),
    )  # fmt: skip


def expressions() -> st.SearchStrategy[Atom]:
    """Well-formed filters built from atoms with not/and/or and parentheses, with their meaning."""

    def extend(inner: st.SearchStrategy[Atom]) -> st.SearchStrategy[Atom]:
        return st.one_of(
            inner.map(lambda a: Atom(f"not ({a.text})", lambda p: not a.judge(p))),
            inner.map(lambda a: Atom(f"!({a.text})", lambda p: not a.judge(p))),
            st.tuples(inner, inner, st.sampled_from(["and", "&&", "AND"])).map(
                lambda t: Atom(f"({t[0].text}) {t[2]} ({t[1].text})", lambda p: t[0].judge(p) and t[1].judge(p))
            ),
            st.tuples(inner, inner, st.sampled_from(["or", "||"])).map(
                lambda t: Atom(f"({t[0].text}) {t[2]} ({t[1].text})", lambda p: t[0].judge(p) or t[1].judge(p))
            ),
        )

    return st.recursive(ATOMS, extend, max_leaves=12)


ATOMS = atoms()


HEADERS = st.none() | st.builds(
    H.Header, st.sampled_from([2, 3, 5]), st.sampled_from([2, 3, 5]), st.sampled_from([80, 1024, 9000]),
    st.sampled_from([80, 1024, 9000]), st.integers(0, 100), st.integers(0, 3), st.integers(0, 9), st.integers(0, 3),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
)  # fmt: skip
PACKETS = st.builds(
    PacketView,
    time=st.floats(0, 2e9),
    device=st.sampled_from(["", "enclave1"]),
    from_guest=st.sampled_from([True, False, None]),
    hdr=HEADERS,
    mon_op=st.integers(0, 5),
    payload=st.sampled_from([b"", b"GET / HTTP/1.1", b"\xb7", b"POST /x"]) | st.binary(max_size=16),
    comment=st.sampled_from([None, "", "denied by policy", "spoofed", "rewritten: x"]),
    proto=st.sampled_from([None, "http", "TLS"]),
    app=st.lists(st.sampled_from(["GET /", "POST /", "200 OK"]), max_size=3).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(expressions(), st.lists(PACKETS, min_size=1, max_size=4))
def test_well_formed_expressions_compile_and_agree_with_a_python_reference(expr: Atom, ps: list[PacketView]) -> None:
    f = compile_filter(expr.text)
    negated = compile_filter(f"not ({expr.text})")
    for p in ps:
        result = f(p)
        assert result is expr.judge(p), expr.text
        assert negated(p) is (not result)


@st.composite
def flat_expressions(draw: st.DrawFn) -> tuple[str, list[list[tuple[bool, Atom]]]]:
    """``a or not b and c ...`` without parentheses, and its terms grouped by precedence."""
    groups: list[list[tuple[bool, Atom]]] = []
    words: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        terms = []
        for t in range(draw(st.integers(1, 3))):
            negate, atom = draw(st.booleans()), draw(ATOMS)
            terms.append((negate, atom))
            words += (["and"] if t else []) + (["not"] if negate else []) + [atom.text]
        groups.append(terms)
        words.append("or")
    return " ".join(words[:-1]), groups


@settings(max_examples=120, deadline=None)
@given(flat_expressions(), PACKETS)
def test_unparenthesised_expressions_follow_not_and_or_precedence(
    flat: tuple[str, list[list[tuple[bool, Atom]]]], p: PacketView
) -> None:
    text, groups = flat
    expected = any(all(a.judge(p) != negate for negate, a in terms) for terms in groups)
    assert compile_filter(text)(p) is expected, text


GRAMMAR_JUNK = st.lists(
    st.sampled_from(
        ['op', 'cid', 'src.port', 'payload', 'app', 'proto', 'rewritten', 'time', ' ', '==', '!=', '<', '>=', 'and',
         'or', 'not', '!', '&&', '(', ')', '{', '}', ',', 'in', 'contains', 'matches', '"', 'r"', '\\', '\\x',
         '4', '0x', 'ab:cd', '1.5', 'rw', 'none', 'true', '[', '*', '(?', '=', '&', "'", '\xe9', '\udcff', '\ud800']
    ),
    max_size=30,
).map("".join)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=40), GRAMMAR_JUNK), PACKETS)
def test_any_text_compiles_or_raises_filter_error_and_never_anything_else(text: str, p: PacketView) -> None:
    try:
        f = compile_filter(text)
    except FilterError as e:
        assert 0 <= e.column <= len(text)
        assert e.render().count("\n") == 1
        return
    assert f(p) in (True, False)
    if text.strip():
        assert compile_filter(f"not ({text})")(p) is (not f(p))


def test_the_error_examples_in_the_docs_are_what_compile_filter_says() -> None:
    with open(DOCS) as f:
        rows = re.findall(r"^\| `(.+)` \| `(.+)` \|$", f.read().split("## Errors", 1)[1], re.M)
    assert len(rows) >= 15
    for text, documented in rows:
        with pytest.raises(FilterError) as info:
            compile_filter(text)
        # the docs shorten long messages with "..."
        for part in documented.split("..."):
            assert part.strip(" ,()") in info.value.message, (text, documented, info.value.message)


def test_the_examples_in_the_docs_compile() -> None:
    with open(DOCS) as f:
        docs = f.read()
    examples = re.findall(r"^\| `(.+)` \| [^`|]+ \|$", docs.split("## Examples", 1)[1].split("## Errors")[0], re.M)
    assert len(examples) >= 8
    for text in [*examples, *re.findall(r"^    (.+)$", docs.split("## Fields")[0], re.M)]:
        compile_filter(text.replace("\\|", "|"))
