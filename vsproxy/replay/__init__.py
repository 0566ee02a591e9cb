"""Replaying captured sessions (issue 16), built on one model of what a capture holds.

Sans-I/O (records, transcripts and bytes in; values and actions out):
    ``transcript``  per connection, what each side sent (messages with SEQPACKET boundaries and
                    EOR, half-closes, resets), who connected, the real peer, verdicts, timing;
                    what a capture lacks (a start, a close, lost bytes) is flagged; also what
                    ``vsproxy read --follow`` and the TUI's follow view print (streaming: ``drain``)
    ``compare``     two transcripts compared as what crossed (``vsproxy diff``)
    ``match``       a guest message against a recorded one: exact, ``prefix:N``, ``http``
    ``http``        just enough HTTP/1.x to match requests and compare responses
    ``server``      server replay: ``ReplayBook`` (recorded connections by port, counters) and
                    ``ServerSession`` (guest bytes in, Send/EndStream/ResetConn/Forward out)
    ``client``      client replay: the plan that plays a connecting side, the answers it gets,
                    their comparison with the capture; ``ClientSession`` for vsproxy's own use

I/O shell:
    ``service``     the ``replay`` service kind and ``ReplayPeer`` (the core's peer for a session)
    ``hosts``       server replay's connections toward the guest, made at their recorded times
    ``options``     ``vsproxy``'s --replay-* flags
    ``player``      plays a plan over a channel (a socket, or the simulated guest's), timing
    ``bulk``        transcripts that leave what the guest sent in the capture file (guest
                    replay in bounded memory; the simulated guest's C sender reads it back)
    ``inbound``     guest replay answering the connections the peer makes toward the guest
    ``auto``        ``--to auto``: where a vsproxy configuration routes each connection
    ``diffcmd``, ``clientcmd``, ``guestcmd``, ``showcmd``, ``cmd``, ``progress``  the commands
"""
