"""vsproxy: a packet-level vsock proxy and traffic inspector.

vsproxy is a vhost-user-vsock back-end: QEMU connects to its unix socket and shares guest
memory; vsproxy reads the guest's virtqueues and is the guest's vsock peer. The map, from
the wire in:

Protocol logic, sans-I/O (bytes and records in, records and actions out):
    ``vhost_user.codec``, ``vhost_user.session``  front-end messages -> actions
    ``virtq``                split rings over guest memory; every guest-written value checked
    ``vsock.header``         the virtio-vsock header (names from linux/virtio_vsock.h)
    ``vsock.core``           one device's connections: the guest's packets in, effects out,
                             built from ``vsock.table`` (connections, state transitions, RST,
                             limits), ``vsock.credit`` (all credit arithmetic),
                             ``vsock.credit_flow``, ``vsock.seqpacket``, ``vsock.tohost`` (guest
                             data to the peers), ``vsock.rx`` (filling the rx ring) and
                             ``vsock.lending`` (connections lent to the C pump)
    ``policy``               routing and allowlist decisions; ``verdict`` their typed marks
    ``limits``               per-tenant limits, descriptor exhaustion, rate-limited logging

I/O shell:
    ``loop``                 one epoll, cancellable timers, the last line of defence
    ``device``               a device: settings, vhost-user socket, host listeners
    ``frontend``             its QEMU session: messages carried out, rings, eventfds, hooks
    ``datapath``             the pump: tx chains to the core, rx chains filled, interrupts
    ``fastpath``, ``_c/``    the C fast paths (optional; ``VSPROXY_NO_C=1`` runs without)
    ``switch``               verdicts carried out: host sides, services, siblings
    ``endpoints``            ``base`` (the Peer interface), ``sockets`` (socket peers),
                             ``listeners``, ``host`` (where host sides are), ``vsock``
                             (AF_VSOCK), ``services`` (a registry of kinds), ``sibling``
    ``app``, ``cli``, ``config``  the running proxy, its command line and files;
                             ``checkview`` what ``--check`` prints

Seeing the traffic (after the verdict, never on the data path's way):
    ``taps``, ``capture``    live taps and pcap/pcapng capture; the capture reader
    ``decode``               the one decoding pipeline: records in, decoded packets out
    ``filter``               the filter language; ``read`` the ``vsproxy read`` command
    ``replay``               transcripts of captures (the one model ``read --follow``, the TUI's
                             follow view and replay print), ``vsproxy diff``, server, client and
                             guest replay (its package docstring has the map)
    ``tui``                  the terminal UI (Textual): a store over the decoder, sources
                             (files, stdin, the control socket, a Proxy in-process), screens
    ``dissectors`` (top level)  scapy layers and application dissectors

``simguest`` is a simulated QEMU and Linux guest driver for tests, benchmarks and the demo.
"""

__version__ = "0.1.0"
