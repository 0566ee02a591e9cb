"""Dissectors for vsock traffic, used off the hot path.

- ``dissectors.layers``: scapy layers for the vsockmon header and the virtio-vsock header,
  registered for LINKTYPE_VSOCK (271) so ``rdpcap`` decodes vsproxy and kernel captures.
  The only module here that imports scapy.
- ``dissectors.app``: application-protocol dissectors (the plugin API, the registry and the
  built-ins: Nitro heartbeat, hybrid handshake, ttrpc, HTTP/1.x, HTTP/2 and gRPC, TLS, QMP,
  systemd notify), pure Python and sans-I/O: bytes of one direction in, messages out.
- ``dissectors.streams``: ``StreamTracker`` reassembles each connection's directions from
  packets in capture order and runs the chosen dissector over them; ``follow`` replays one
  connection's bytes.
- ``dissectors/wireshark/vsproxy.lua``: a Wireshark/tshark post-dissector.

docs/dissectors.md shows how to write and register a dissector.
"""
