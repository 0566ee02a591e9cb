"""One transcript model behind `vsproxy read --follow`, the TUI's follow view and `vsproxy replay
show`: on the captures in captures/ (HTTP, SEQPACKET, the Nitro heartbeat, a denial, a refusal in
classic pcap) and on edits of them (a capture that starts mid-connection, one that lost a
packet, one that ends early, one that ends inside a SEQPACKET exchange), each of the three
outputs is read back into the same per-connection steps (who sent what, sizes, SEQPACKET marks,
application messages, bytes, half-closes with their flags, resets), the same titles and the
same account of what the capture lacks, and they must equal what the transcript API says."""

from __future__ import annotations

import codecs
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from capture_edit import read as read_packets
from capture_edit import write
from tui_helpers import plist, source_app, static_text, sync, until

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import Record, records
from vsproxy.decode import Decoder
from vsproxy.read import MAX_SUMMARIES
from vsproxy.replay.transcript import (
    Conversation,
    Data,
    Made,
    Reset,
    Shutdown,
    Transcript,
    TranscriptBuilder,
    load_transcript,
    transcript_of,
)
from vsproxy.tui import follow
from vsproxy.tui.sources import FileSource
from vsproxy.vsock import header as H

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "captures"


class Step(NamedTuple):
    """A step as every output can say it."""

    from_client: bool
    what: str  # "data", "SHUTDOWN RCV|SEND", "RST"
    size: int = 0
    marks: str = ""  # SEQPACKET: "EOM EOR", "EOM", "(no EOM)"
    app: str = ""  # the application messages' summaries, "; "-joined
    data: bytes = b""


class Conv(NamedTuple):
    title: str
    steps: list[Step]
    lacks: set[str]  # what the capture lacks, as the problems say it (its start aside)
    lost: int  # bytes the gap lines say are missing


# --- the captures ---------------------------------------------------------------------------------


def edits(tmp: Path) -> dict[str, Path]:
    http = read_packets(CAPTURES / "http-over-vsock.pcapng")
    seq = read_packets(CAPTURES / "seqpacket.pcapng")
    return {
        # the REQUEST and RESPONSE are not in it: who connected is the first sender's guess
        "mid": write(tmp / "mid.pcapng", http[2:]),
        # the host's 194-byte answer was lost (a capture drop): the guest's fwd_cnt says so
        "drops": write(tmp / "drops.pcapng", [p for p in http if not (p[1].op == H.Op.RW and len(p[2]) == 194)]),
        "early": write(tmp / "early.pcapng", http[:5]),  # ends before the connection closed
        "seqcut": write(tmp / "seqcut.pcapng", seq[:4]),
    }


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    committed = {p.stem: p for p in CAPTURES.glob("*.pcap*")}
    assert {"http-over-vsock", "seqpacket", "nitro-heartbeat", "sibling-denied",
            "kernel-vsockmon-loopback"} <= set(committed)
    return committed | edits(tmp_path_factory.mktemp("follow"))


# --- each output read back ---------------------------------------------------------------------------


def from_transcript(t: Transcript) -> list[Conv]:
    out = []
    for c in t.conversations:
        steps = []
        for s in c.steps:
            if isinstance(s, Data):
                marks = ""
                if c.type_name == "SEQPACKET":
                    marks = " ".join(["EOM" if s.eom else "(no EOM)"] + (["EOR"] if s.eor else []))
                steps.append(Step(s.from_client, "data", len(s.data), marks, "; ".join(s.app), s.data))
            elif isinstance(s, Shutdown):
                steps.append(Step(s.from_client, f"SHUTDOWN {s.flag_names}"))
            else:
                assert isinstance(s, Reset)
                steps.append(Step(s.from_client, "RST"))
        out.append(Conv(f"=== {c.title()} ===", steps, lacks(c), c.lost))
    return out


def lacks(c: Conversation) -> set[str]:
    return {p for p in c.problems() if p != "started before the capture"}


_HEAD = re.compile(r"(>>>|<<<) (?:#\d+(?:-#\d+)? |so far )?(?:\w+ -> \w+ )(.*)")
_DATA = re.compile(r"(\d+) bytes?((?: EOM| \(no EOM\))?(?: EOR)?)(?:  (.*))?")
_GAP = re.compile(r"!!! (?:#\d+ )?\w+ -> \w+ (\d+) bytes? missing ")


def parse(text: str, *, tui: bool) -> list[Conv]:
    """`vsproxy read --follow` output, or the TUI follow view's text (``tui``: packet numbers
    after the arrow, [EOM] marks, ⮑ lines for the application messages, message-end rules), as
    conversations in order of first appearance (a header printed again adds to the same one)."""
    convs: dict[str, Conv] = {}
    cur: Conv | None = None
    body: list[str] = []
    in_notes = False

    def close() -> None:
        if cur is not None and body and cur.steps:
            last = cur.steps.pop()
            cur.steps.append(last._replace(data=codecs.escape_decode("".join(body).encode())[0]))
        body.clear()

    for line in text.splitlines():
        if line.startswith("=== "):
            close()
            cur = convs.setdefault(line, Conv(line, [], set(), 0))
            in_notes = True
            continue
        assert cur is not None, line
        if in_notes and line.startswith("    ("):
            note = line[5:-1]
            if not note.startswith("started before the capture"):
                cur.lacks.add(note)
            continue
        if in_notes and line.startswith("    ["):
            continue  # the verdict comment: compared through the title's outcome
        in_notes = False
        m = _HEAD.fullmatch(line)
        g = _GAP.match(line)
        if m is not None:
            close()
            arrow, rest = m.groups()
            d = _DATA.fullmatch(rest.replace("[EOM]", "EOM").replace("[EOR]", "EOR"))
            if d is not None:
                cur.steps.append(Step(arrow == ">>>", "data", int(d.group(1)), d.group(2).strip(), d.group(3) or ""))
            else:
                what = re.sub(r" \(the \w+ [a-z ]+\)$", "", rest)
                cur.steps.append(Step(arrow == ">>>", what))
        elif g is not None:
            close()
            convs[cur.title] = cur = cur._replace(lost=cur.lost + int(g.group(1)))
        elif tui and line.startswith("    ⮑ "):
            last = cur.steps.pop()
            app = line[len("    ⮑ "):]
            cur.steps.append(last._replace(app=f"{last.app}; {app}" if last.app else app))
        elif tui and line.endswith(" message end"):
            continue
        else:
            body.append(line)
    close()
    return list(convs.values())


def read_follow(path: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "vsproxy", "read", "--follow", "all", str(path), *args],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (r.returncode, r.stderr) == (0, "")
    return r.stdout


def tui_views(path: Path) -> str:
    """The follow view of each connection the TUI's store holds, as its text, one after another."""
    src = FileSource([str(path)])
    src.start()
    try:
        src.join(10)
        assert src.done and src.error is None
        return "".join(follow.text_of(follow.followed(src.store, cid)) for cid in sorted(src.store.conns))
    finally:
        src.close()


def replay_show(path: Path) -> list[tuple[str, list[tuple[bool, str]]]]:
    """`vsproxy replay show --data`: each title and its steps' (direction, what) with the time cut."""
    r = subprocess.run([sys.executable, "-m", "vsproxy", "replay", "show", "--data", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out: list[tuple[str, list[tuple[bool, str]]]] = []
    for line in r.stdout.splitlines():
        if line.startswith("=== "):
            out.append((line, []))
        elif line.startswith((">>> ", "<<< ")):
            arrow, _, rest = line.split(" ", 2)
            out[-1][1].append((arrow == ">>>", rest))
    return out


def show_lines(conv: Conv) -> list[tuple[bool, str]]:
    """What `replay show` prints for these steps (its own rendering, checked against the model)."""
    out = []
    for s in conv.steps:
        if s.what == "data":
            marks = f" {s.marks}" if s.marks else ""
            app = f"  {s.app}" if s.app else ""
            out.append((s.from_client, f"{s.size} byte{'' if s.size == 1 else 's'}{marks}{app}"))
        else:
            out.append((s.from_client, s.what))
    return out


# --- the tests -----------------------------------------------------------------------------------------

NAMES = ["http-over-vsock", "seqpacket", "nitro-heartbeat", "sibling-denied", "kernel-vsockmon-loopback",
         "mid", "drops", "early", "seqcut"]


@pytest.mark.parametrize("name", NAMES)
def test_read_follow_the_tui_follow_view_and_replay_show_agree_with_the_transcript(
        name: str, captures: dict[str, Path]) -> None:
    path = captures[name]
    model = from_transcript(load_transcript(str(path)))
    assert model and all(len(max((s.app.split("; ") for s in c.steps), key=len, default=[])) <= MAX_SUMMARIES
                         for c in model)  # read cuts longer lists: these captures do not need it
    assert parse(read_follow(path), tui=False) == model
    assert parse(tui_views(path), tui=True) == model
    shown = replay_show(path)
    assert [title for title, _ in shown] == [c.title for c in model]
    assert [steps for _, steps in shown] == [[(fc, re.sub(r"^\+[\d.]+s ", "", w)) for fc, w in show_lines(c)]
                                              for c in model]


def test_each_edited_capture_says_what_it_lacks_in_every_view(captures: dict[str, Path]) -> None:
    """The edits are what they claim (so the agreement above covers each kind of incomplete capture)."""
    mid, drops, early, seqcut = (load_transcript(str(captures[n])) for n in ("mid", "drops", "early", "seqcut"))
    assert mid.started_mid and "[mid-stream]" in read_follow(captures["mid"])
    assert "(started before the capture: who connected is a guess)" in read_follow(captures["mid"])
    assert drops.lost == 194 and (
        "!!! host -> guest 194 bytes missing (the guest acknowledged them; the capture lost them)"
        in read_follow(captures["drops"]).splitlines())
    assert "!!! #6 host -> guest 194 bytes missing" in tui_views(captures["drops"])
    assert early.ended_early and read_follow(captures["early"]).endswith(
        "=== #1 app 5:2157979543 > 2:8080 STREAM http ===\n    (not closed when the capture ended)\n")
    assert seqcut.ended_early and "    (not closed when the capture ended)" in tui_views(captures["seqcut"])


def test_a_filter_shows_whole_connections_a_packet_of_which_it_matches(captures: dict[str, Path]) -> None:
    """With a filter, `--follow all` shows the connections `replay show --filter` shows, whole,
    even when the matching packet comes after their first steps (they wait for it)."""
    path = captures["sibling-denied"]
    t = load_transcript(str(path), "op == shutdown and device == vault")
    picked = [c for c in from_transcript(t) if c.title.startswith("=== #3 ")]
    assert parse(read_follow(path, "op == shutdown and device == vault"), tui=False) == picked


@sync
async def test_the_follow_screen_of_a_capture_with_drops_shows_where_bytes_are_missing(
        captures: dict[str, Path]) -> None:
    src = FileSource([str(captures["drops"])])
    src.start()
    src.join(10)
    app = source_app(src)
    async with app.run_test(size=(110, 40)) as pilot:
        plist(app).move_to(2)
        await pilot.press("f")
        await until(pilot, lambda: app.current_mode == "follow", what="the follow screen")
        text = static_text(app, "#stream")
        assert "    (194 bytes missing from the capture)" in text
        assert "!!! #6 host -> guest 194 bytes missing (the guest acknowledged them; the capture lost them)" in text
        assert "<<< #8 host -> guest RST" in text


@sync
async def test_the_follow_screen_of_a_denied_connection_names_the_rule() -> None:
    src = FileSource([str(CAPTURES / "sibling-denied.pcapng")])
    src.start()
    src.join(10)
    app = source_app(src)
    async with app.run_test(size=(110, 40)) as pilot:
        plist(app).move_to(0)
        await pilot.press("f")
        await until(pilot, lambda: app.current_mode == "follow", what="the follow screen")
        text = static_text(app, "#stream")
        assert text.startswith("=== #1 app 5:2400453637 > 6:5002 STREAM [denied] ===\n"
                               "    [denied by not in app's outbound allowlist; vsproxy answers RST]\n")
        assert "<<< #2 host -> guest RST" in text


# --- the streaming builder read --follow prints from ------------------------------------------------------


def rec(src: tuple[int, int], dst: tuple[int, int], op: int, payload: bytes = b"", fwd_cnt: int = 0,
        ts: float = 1.0) -> Record:
    hdr = H.pack(src[0], dst[0], src[1], dst[1], len(payload), H.Type.STREAM, op, 0, 262144, fwd_cnt)
    return Record(ts, "app", src[0] != 2, fmt.vsockmon_frame(hdr, payload), None)


def connection(port: int, ts: float = 1.0) -> list[Record]:
    g, h = (5, port), (2, 7000)  # port 7000: no dissector, bytes are the chunks as they crossed
    return [rec(g, h, H.Op.REQUEST, ts=ts), rec(h, g, H.Op.RESPONSE, ts=ts), rec(g, h, H.Op.RW, b"ping", ts=ts),
            rec(h, g, H.Op.RW, b"pong", 4, ts=ts), rec(g, h, H.Op.RST, fwd_cnt=4, ts=ts)]


def test_a_streaming_builder_hands_out_each_step_once_in_order_with_its_packets_and_lets_it_go() -> None:
    dec, b = Decoder(), TranscriptBuilder(stream=True)
    made: list[Made] = []
    for r in connection(1024):
        b.feed(dec.decode(r))
        made += b.drain()
        assert all(not c.steps for c in b.transcript.conversations)  # handed out: not kept
    b.finish()
    assert b.drain() == [] and b.held == 0
    assert [(type(m.step).__name__, m.first, m.last) for m in made] == [("Data", 2, 2), ("Data", 3, 3),
                                                                         ("Reset", 4, 4)]
    assert [m.step.data for m in made if isinstance(m.step, Data)] == [b"ping", b"pong"]
    whole = transcript_of(connection(1024))
    assert [m.step for m in made] == whole.conversations[0].steps  # the same steps a whole transcript has


def test_steps_of_a_connection_selected_late_come_out_first_when_it_is() -> None:
    dec, b = Decoder("op == rst"), TranscriptBuilder(stream=True)
    made: list[Made] = []
    for r in connection(1024):
        b.feed(dec.decode(r))
        made += b.drain()
        if len(made) == 0:
            assert b.held in (0, 4, 8)  # waiting, counted
    assert [type(m.step).__name__ for m in made] == ["Data", "Data", "Reset"] and b.held == 0


def test_a_connection_that_ends_unselected_is_let_go() -> None:
    dec, b = Decoder("port == 1"), TranscriptBuilder(stream=True)
    for r in connection(1024):
        b.feed(dec.decode(r))
        assert b.drain() == []
    assert b.held == 0 and b.transcript.conversations[0].steps == []


def test_closed_conversations_past_recent_are_let_go_but_those_the_capture_lacks_part_of_stay() -> None:
    dec, b = Decoder(), TranscriptBuilder(stream=True, recent=2)
    lossy = [rec((5, 9), (2, 7000), H.Op.REQUEST), rec((2, 7000), (5, 9), H.Op.RESPONSE),
             rec((2, 7000), (5, 9), H.Op.CREDIT_UPDATE, fwd_cnt=50), rec((5, 9), (2, 7000), H.Op.RST)]
    for r in lossy + [r for port in range(2000, 4100) for r in connection(port)]:
        b.feed(dec.decode(r))
        b.drain()
    convs = b.transcript.conversations
    assert len(convs) < 1100 and convs[0].lost == 50  # 2,101 connections; the lossy one is kept for the end
    assert b.conversation(convs[-1].id) is convs[-1] and b.conversation(1) is None


def test_following_one_id_stops_reading_once_no_packet_can_join_it(tmp_path: Path) -> None:
    from vsproxy import read

    recs = [r for port in range(2000, 2010) for r in connection(port, ts=port)]
    path = tmp_path / "ten.pcapng"
    blocks = [fmt.pcapng_shb(), fmt.pcapng_idb("app")]
    blocks += [fmt.pcapng_epb(0, r.ts, r.frame, inbound=bool(r.inbound)) for r in recs]
    path.write_bytes(b"".join(blocks))
    dec = Decoder(recent=2)
    out = io.StringIO()
    f = read.Follow(out, 1, recent=2)
    with open(path, "rb") as fh:
        f.run(dec, records(fh))
    # its packets, then two more connections ended: the decoder (remembering 2) has forgotten it
    assert dec.count == 5 + 2 * 5
    assert out.getvalue().endswith(">>> guest -> host RST\n") and out.getvalue().count("=== #") == 1


def test_a_live_follow_view_shows_what_is_still_arriving_and_does_not_call_an_open_connection_ended() -> None:
    from vsproxy.tui.model import Store

    g, h = (5, 1024), (2, 8080)
    request = b"GET /v1/keys HTTP/1.1\r\nHost: keys.internal\r\n\r\n"
    store = Store(limit=100)
    for r in (rec(g, h, H.Op.REQUEST), rec(h, g, H.Op.RESPONSE), rec(g, h, H.Op.RW, request[:10])):
        store.feed(r)
    (cid,) = store.conns
    live = follow.followed(store, cid, ended=False)
    assert live.steps == [] and live.problems == []
    assert [(d.data, d.from_client) for d in live.arriving] == [(request[:10], True)]
    text = follow.render(live, False, drops=3).plain
    assert ">>> so far guest -> host 10 bytes\nGET /v1/ke\n" in text
    assert "(the live feed dropped 3 packets: this connection may lack some)" in text
    ended = follow.followed(store, cid, ended=True)  # the same packets, the source done: the capture ended
    assert ended.arriving == [] and [type(s).__name__ for s, _, _ in ended.steps] == ["Data"]
    assert ended.problems == ["not closed when the capture ended"]
    store.feed(rec(g, h, H.Op.RW, request[10:]))  # the request is whole: a step, with its message
    (step, first, last), = follow.followed(store, cid, ended=False).steps
    assert isinstance(step, Data) and step.data == request and step.app == ("HTTP GET /v1/keys",)
    assert (first, last) == (2, 3)
    text = follow.text_of(follow.followed(store, cid, ended=False))
    assert f">>> #3-#4 guest -> host {len(request)} bytes\nGET /v1/keys HTTP/1.1" in text


def test_follow_all_counts_the_packets_of_connections_the_capture_lacks(tmp_path: Path) -> None:
    http = read_packets(CAPTURES / "http-over-vsock.pcapng")
    stray = http[6]  # the guest's CREDIT_UPDATE, alone: no connection to give it to
    path = write(tmp_path / "stray.pcapng", [stray])
    assert read_follow(path) == ("=== the capture ===\n"
                                 "    (1 packet of connections whose start and data are not in the capture)\n")
    r = subprocess.run([sys.executable, "-m", "vsproxy", "read", "--follow", "1", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "vsproxy read: --follow 1: nothing to show\n")


def test_connections_that_never_close_are_let_go_and_those_lacking_bytes_are_counted(tmp_path: Path) -> None:
    from vsproxy import read

    def lossy(port: int) -> list[Record]:  # never closed, and the host acknowledged 50 bytes it never got
        g, h = (5, port), (2, 7000)
        return [rec(g, h, H.Op.REQUEST), rec(h, g, H.Op.RESPONSE), rec(h, g, H.Op.CREDIT_UPDATE, fwd_cnt=50)]

    recs = [r for port in range(3000, 5000) for r in lossy(port)]
    dec, b = Decoder(), TranscriptBuilder(stream=True, recent=4, max_live=8)
    for r in recs:
        b.feed(dec.decode(r))
        b.drain()
    t = b.finish()
    assert len(t.conversations) <= 8 + 4 + 1024 and t.forgotten > 900  # bounded, and the rest counted
    assert len(t.conversations) + t.forgotten == 2000

    path = tmp_path / "lossy.pcapng"
    path.write_bytes(b"".join([fmt.pcapng_shb(), fmt.pcapng_idb("app")]
                              + [fmt.pcapng_epb(0, r.ts, r.frame, inbound=bool(r.inbound)) for r in recs]))
    out = io.StringIO()
    f = read.Follow(out, lambda c: True, every=True)
    f.builder = TranscriptBuilder(stream=True, recent=4, max_live=8)
    with open(path, "rb") as fh:
        f.run(Decoder(), records(fh))
    text = out.getvalue()
    assert text.count("!!! guest -> host 50 bytes missing") == 2000  # each said where it showed
    forgotten = f.builder.transcript.forgotten
    assert text.endswith(f"=== the capture ===\n    ({forgotten} more connections the capture lacks part of, said "
                         "above where it showed)\n")


def test_a_snaplen_cut_is_counted_at_the_end_not_called_a_capture_drop(tmp_path: Path) -> None:
    http = read_packets(CAPTURES / "http-over-vsock.pcapng")
    blocks = [fmt.pcapng_shb(), fmt.pcapng_idb("app")]
    for r, hdr, payload in http:
        keep = payload[:16]  # as `vsproxy ctl PATH pcap --snaplen` records it: the header says the whole length
        head = fmt.vsockmon_frame(H.pack(*hdr), b"")
        blocks += fmt.pcapng_epb_parts(0, r.ts, head, keep, inbound=bool(r.inbound),
                                       orig=len(head) + len(payload) if len(keep) < len(payload) else 0)
    path = tmp_path / "snapped.pcapng"
    path.write_bytes(b"".join(blocks))
    out = read_follow(path)
    assert "!!!" not in out  # the peers acknowledged bytes the records say were cut: not a drop
    assert ">>> guest -> host 16 bytes\nGET /v1/keys HTT\n" in out
    cut = 91 - 16 + 194 - 16
    assert out.endswith(f"    ({cut} bytes cut by a snaplen (the records keep only each packet's first bytes))\n")
    assert f"    ({cut} bytes cut by a snaplen" in tui_views(path) and "!!!" not in tui_views(path)
