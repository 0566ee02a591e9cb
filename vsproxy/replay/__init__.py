"""Replaying captured sessions (issue 16), built on one model of what a capture holds.

- ``transcript``  per connection, what each side sent (messages with SEQPACKET boundaries,
                  half-closes, resets), who connected, verdicts, timing; sans-I/O over decoded
                  packets (``vsproxy.decode``)
- ``compare``     two transcripts compared (what ``vsproxy diff`` prints)
- ``diffcmd``     the ``vsproxy diff A B`` command
"""
