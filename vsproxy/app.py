"""The running proxy: devices on one loop, signals, counters, clean shutdown."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from vsproxy.capture.hub import LIVE_BYTES, CaptureHub, Subscription
from vsproxy.capture.writer import CaptureOptions, CaptureWriter
from vsproxy.control import ControlServer
from vsproxy.device import Device, DeviceConfig
from vsproxy.limits import Limits, default_limits, fds_needed, nofile_limit
from vsproxy.loop import Loop
from vsproxy.policy import DeviceSpec, Policy
from vsproxy.snapshot import Snapshot, take
from vsproxy.switch import Switch
from vsproxy.vsock.table import Counters

log = logging.getLogger("vsproxy")


class ConfigError(Exception):
    """A setting that cannot work; reported as one line, exit status 2."""


def check_socket_path(path: str, what: str) -> None:
    """Refuse a path whose directory is missing or that a live process serves; remove a stale one."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"{what} {path}: directory {directory} does not exist")
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
            if e.errno == errno.ENOTSOCK:
                raise ConfigError(f"{what} {path}: exists and is not a socket") from None
            os.unlink(path)  # stale socket of a process that is gone
            return
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"{what} {path}: already served by another process")


def _figures(values: Iterator[int]) -> str:
    """``65536``, or ``100..400`` when devices differ."""
    vs = sorted(set(values))
    return str(vs[0]) if len(vs) == 1 else f"{vs[0]}..{vs[-1]}"


def report_lines(snap: Snapshot) -> list[str]:
    """The SIGUSR1 and exit report: a line per device, per rule, the process, the capture."""
    lines = []
    for d in snap.devices:
        row: dict[str, int] = {"sessions": d.sessions}
        if d.frontend:
            c = d.counters
            row.update(
                conns=d.connections, tx_pkts=c.tx_packets, tx_bytes=c.tx_bytes, rx_pkts=c.rx_packets,
                rx_bytes=c.rx_bytes, rst=c.rst_sent, spoofed=c.spoofed, bad_pkts=c.bad_packets,
                credit_violations=c.credit_violations, bad_chains=d.bad_chains, refused=c.connections_refused,
                c_pump_updates=c.pump_updates, c_pump_reads=c.pump_reads, c_pump_kicks=c.pump_kicks,
                c_pump_sends=c.pump_sends, c_pump_blocked=c.pump_blocked, c_pump_read_ahead=c.pump_read_ahead,
                limit_refused=c.limit_refused, faults=c.faults, buffer_resets=c.buffer_resets,
                control_full=c.control_full,
            )
        lines.append(f"{d.name}: " + " ".join(f"{k}={v}" for k, v in row.items()))
    for r in snap.rules:
        lines.append(f"rule {r.name!r}: connections={r.connections} denials={r.denials} rewrites={r.rewrites} "
                     f"packets={r.packets} bytes={r.bytes}")
    for name, counts in snap.services.items():
        lines.append(f"{name}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    h = snap.process
    lines.append(f"process: fd_exhausted={h.fd_exhausted} accept_pauses={h.accept_pauses} "
                 f"handshakes_dropped={h.handshakes_dropped} faults={h.faults}")
    for name, row in (snap.capture or {}).items():
        head = "capture: " if name == "all" else f"capture {name}: "
        lines.append(head + " ".join(f"{k}={v}" for k, v in row.items()))
    return lines


class Proxy:
    def __init__(self, configs: list[DeviceConfig], policy: Policy | None = None, *, busy_poll_us: int = 0) -> None:
        self.loop = Loop(busy_poll_us)
        self.configs = configs
        self.devices: list[Device] = []
        if policy is None:
            policy = Policy([DeviceSpec(c.name, c.guest_cid, c.groups) for c in configs])
        self.switch = Switch(policy, self.loop)
        self.capture: CaptureWriter | None = None
        self._live: CaptureHub | None = None  # the sink while only live subscribers capture (no --pcap)
        self._live_lock = threading.Lock()
        self.limits: list[Limits] = []
        self.control: ControlServer | None = None

    def start_capture(self, options: CaptureOptions) -> None:
        try:
            self.capture = CaptureWriter(options, [c.name for c in self.configs])
        except OSError as e:
            raise ConfigError(f"--pcap {options.path}: {e.strerror}") from None
        self.switch.taps.set_sink(self.capture)

    def start(self) -> None:
        for cfg in self.configs:
            check_socket_path(cfg.socket_path, "--socket")
            if cfg.endpoints.uds_path is not None:
                check_socket_path(cfg.endpoints.uds_path, "--uds-path")
        nofile = nofile_limit()
        default = default_limits(nofile, len(self.configs))
        self.limits = [cfg.limits(default) for cfg in self.configs]
        need = fds_needed(self.limits)
        log.info("open-file limit %d; per device at most %s connections, %s pending connects, %s connections "
                 "in a hybrid handshake, %s bytes held for host sides, %s control packets queued", nofile,
                 _figures(x.max_connections for x in self.limits), _figures(x.max_pending for x in self.limits),
                 _figures(x.max_handshakes for x in self.limits), _figures(x.max_buffered for x in self.limits),
                 _figures(x.max_control for x in self.limits))
        if need > nofile:
            log.warning("the limits set allow %d descriptors, more than the open-file limit %d: past it, new "
                        "connections are refused (counted as fd_exhausted)", need, nofile)
        try:
            for cfg, lim in zip(self.configs, self.limits, strict=True):
                self.devices.append(Device(cfg, self.loop, self.switch, lim))
            # vhost-user sockets last, the first device's very last: once it exists, every
            # host listener and every other device is ready.
            for d in reversed(self.devices):
                d.listen()
                log.info("%s: serving vhost-user on %s (guest CID %d)", d.name, d.config.socket_path,
                         d.config.guest_cid)
        except OSError as e:
            self.close()
            raise ConfigError(f"cannot listen: {e}") from None

    def start_control(self, path: str) -> None:
        """Serve the control socket at ``path`` (docs/control.md)."""
        check_socket_path(path, "--control")
        try:
            self.control = ControlServer(path, self)
        except OSError as e:
            raise ConfigError(f"--control {path}: {e.strerror or e}") from None

    def reset_counters(self) -> None:
        """Every device's and rule's counters from zero again (the control socket's ``reset``).
        On the loop thread. What the C pump counted for the connections it runs goes too."""
        for d in self.devices:
            if d.session is not None:
                core = d.session.core
                core.sync_owned()
                core.counters = Counters()
                for conn in core.conns.values():
                    conn.stats[:] = [0, 0, 0, 0]
                for q in d.session.queues:
                    if q is not None:
                        q.counters.bad_chains = 0
        self.switch.rules.clear()
        self.switch.rule_totals.clear()

    def run(self) -> None:
        self.loop.run()

    def stop(self) -> None:
        """Stop the loop; safe from another thread."""
        self.loop.stopping = True
        self.loop.wakeup()

    def stop_capture(self) -> None:
        """Detach the capture and let its writer finish the queue (so its counters are final);
        live subscriptions end too (what they hold can still be read)."""
        if self.capture is not None and self.switch.taps.sink is self.capture:
            self.switch.taps.set_sink(None)
            self.capture.close()
        with self._live_lock:
            live, self._live = self._live, None
        if live is not None:
            if self.switch.taps.sink is live:
                self.switch.taps.set_sink(None)
            live.close()

    # -- live subscribers of the capture stream -------------------------------------------
    @property
    def capture_hub(self) -> CaptureHub | None:
        """The capture sink now: the --pcap writer, a hub for live subscribers only, or None."""
        sink = self.switch.taps.sink
        return sink if isinstance(sink, CaptureHub) else None

    def subscribe_packets(self, maxbytes: int = LIVE_BYTES, snaplen: int = 0) -> Subscription:
        """A live view of every packet captured from now on, as a byte stream that is a capture
        on its own: the stream header, then whole records (pcapng; classic pcap when --pcap
        chose ``--pcap-format pcap``). It keeps up to ``maxbytes`` unread; what does not fit is
        dropped for this subscriber alone and counted (``Subscription.dropped``), so a slow or
        stalled one never slows the data path, the file or another subscriber. Read it with
        ``read_piece(timeout)`` (blocking, no copy: release each piece when done with it),
        ``read(timeout)`` or ``take()`` (copies); ``close()`` it when done. ``snaplen`` N > 0:
        the subscriber needs only the first N payload bytes of each packet (tcpdump's -s), so
        while no file and no other subscriber needs more, the data path copies no more than that
        (records keep at least N bytes, and say each packet's whole length).

        Thread-safe. Without --pcap, the first subscriber sets the capture sink (the C paths
        then write records) and closing the last removes it; per-packet taps are never used,
        so the C paths stay on either way."""
        taps = self.switch.taps
        with self._live_lock:
            if self.capture is not None and taps.sink is self.capture:
                return self.capture.subscribe(maxbytes, snaplen=snaplen)
            if self._live is None:
                self._live = CaptureHub([c.name for c in self.configs], on_empty=self._last_left)
                taps.set_sink(self._live)
            return self._live.subscribe(maxbytes, snaplen=snaplen)

    def _last_left(self, hub: CaptureHub) -> None:
        """The last live subscriber of a hub without --pcap left: no capture sink any more."""
        with self._live_lock:
            if hub is not self._live or hub.subscriptions:
                return
            self._live = None
            if self.switch.taps.sink is hub:
                self.switch.taps.set_sink(None)
        hub.close()

    def close(self) -> None:
        if self.loop.closed:
            return  # closed already (a start that failed closes what it opened)
        if self.control is not None:
            self.control.close()
            self.control = None
        for d in self.devices:
            d.close()
        self.stop_capture()
        self.devices = []
        self.loop.close()

    def snapshot(self, timeout: float = 5.0) -> Snapshot:
        """Every device, rule and connection, typed; changes nothing. Safe from any thread: off the
        loop's thread it is taken on the loop (TimeoutError if the loop does not answer)."""
        loop = self.loop
        if loop.thread_id is None or loop.thread_id == threading.get_ident() or loop.stopping:
            return take(self)
        done = threading.Event()
        box: list[Snapshot | BaseException] = []

        def on_loop() -> None:
            try:
                box.append(take(self))
            except BaseException as e:  # handed to the caller's thread
                box.append(e)
            done.set()

        loop.call_soon_threadsafe(on_loop)
        if not done.wait(timeout):
            raise TimeoutError("the loop did not answer for a snapshot")
        got = box[0]
        if isinstance(got, BaseException):
            raise got
        return got

    def capture_rows(self) -> dict[str, dict[str, int]]:
        """``all``: the --pcap file's counters; ``live``: the hub's live subscribers, what the
        ring took from the C and the Python paths, what it dropped, and what the subscribers
        missed between them (each also reads its own ``Subscription.dropped``)."""
        rows: dict[str, dict[str, int]] = {}
        if self.capture is not None:
            cc = self.capture.counters
            rows["all"] = {"packets": cc.packets, "bytes": cc.bytes, "dropped": cc.dropped, "files": cc.files}
            if self.capture.options.lossless:  # how long the data path waited for the file
                rows["all"] |= {"waits": self.capture.stats.waits, "waited_ms": int(self.capture.stats.waited * 1000)}
            if self.capture.error is not None:  # the file failed (disk full): what it missed since
                rows["all"]["failed"] = cc.failed
        hub = self.capture_hub
        if hub is not None and hub.live:
            subs = [s for s in hub.subscriptions if s.live]
            st = hub.stats
            rows["live"] = {"subscribers": len(subs), "c_records": st.c_records, "py_records": st.py_records,
                            "ring_dropped": st.dropped, "subscriber_dropped": sum(s.dropped for s in subs)}
        return rows

    def report(self, out: TextIO = sys.stderr) -> None:
        for line in report_lines(self.snapshot()):
            print(line, file=out, flush=True)
        b = self.loop.busy
        if b.max_ns:  # what --busy-poll cost and saved
            print(f"busy poll: max_us={b.max_ns // 1000} hits={b.hits} misses={b.misses} "
                  f"spent_ms={b.spent_ns / 1e6:.1f}", file=out, flush=True)

    def _on_signal(self, pending: list[int]) -> Callable[[int, object], None]:
        def handler(signum: int, frame: object) -> None:
            pending.append(signum)
            if signum != signal.SIGUSR1 and self.capture is not None:
                self.capture.interrupt()  # a lossless capture's waits end soon: the exit is not held
        return handler

    @contextmanager
    def signals(self, on_stop: Callable[[int], None] | None = None) -> Iterator[None]:
        """SIGINT/SIGTERM stop the loop; SIGUSR1 prints counters. Handlers only set flags
        and wake the loop through a socketpair, so no signal runs inside the data path.
        ``on_stop``: called with the first SIGINT/SIGTERM instead of stopping at once (it stops
        the loop when it is ready: vsproxy enclave run stops QEMU first, which needs its
        vhost-user back-end to answer while it shuts down); a second one stops at once."""
        stopping: list[int] = []
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        pending: list[int] = []
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            handlers[sig] = signal.signal(sig, self._on_signal(pending))

        def on_wakeup() -> None:
            try:
                r.recv(64)
            except BlockingIOError:
                pass
            while pending:
                sig = pending.pop(0)
                if sig == signal.SIGUSR1:
                    self.report()
                elif on_stop is not None and not stopping:
                    stopping.append(sig)
                    log.info("signal %d: stopping the programs vsproxy started, then vsproxy", sig)
                    on_stop(sig)
                else:
                    log.info("signal %d: shutting down", sig)
                    self.stop()

        self.loop.set_reader(r.fileno(), on_wakeup)
        try:
            yield
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            signal.set_wakeup_fd(old_fd)
            self.loop.forget(r.fileno())
            r.close()
            w.close()
