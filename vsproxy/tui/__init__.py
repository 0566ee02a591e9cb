"""vsproxy's interactive terminal UI (Textual): captures, live pipes and a running vsproxy.

Layers, from the data in:

- ``model``: the store (sans-I/O, no Textual): per-packet arrays filled by one ``Decoder``,
  connections and devices as the capture shows them, filters run in steps, marks, pcapng out;
  ``detail`` (the ``-V`` text as a tree with byte ranges), ``follow`` (a stream as styled
  text) and ``bars`` are sans-I/O too;
- ``fileindex``: records of capture files by location (the store keeps locations, not frames);
- ``ingest``: the live sources' decoding, in a process of its own (``python -m
  vsproxy.tui.ingest``): finished rows in batches to the store (``Store.apply``), feed drops
  counted when it falls behind, never the writer held back;
- ``sources``: threads that fill a store: files (``--follow-file``), stdin, a control socket
  (``--attach``), a ``Proxy`` in this process (``vsproxy --tui``);
- ``widgets``: the virtual packet list (``ScrollView.render_line``, rows decoded when drawn),
  the detail tree and hex pane, the filter bar, the status bar;
- ``screens``: packets, connections, devices, follow, help, save; ``app``: the app and the
  ``vsproxy tui`` command line; ``styles``: the colours that carry meaning.
"""
