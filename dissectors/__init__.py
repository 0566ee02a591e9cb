"""Dissectors for vsock traffic, used off the hot path.

- ``dissectors.layers``: scapy layers for the vsockmon header and the virtio-vsock header,
  registered for LINKTYPE_VSOCK (271) so ``rdpcap`` decodes vsproxy and kernel captures.
- ``dissectors.app``: application-protocol dissectors over reassembled streams.
- ``dissectors/wireshark/vsproxy.lua``: a Wireshark/tshark post-dissector.
"""
