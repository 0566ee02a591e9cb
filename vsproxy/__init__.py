"""vsproxy: a packet-level vsock proxy and traffic inspector.

Architecture. vsproxy is a vhost-user-vsock back-end: QEMU connects to its unix
socket and shares guest memory; vsproxy reads the guest's virtqueues and is the
guest's vsock peer. The protocol logic is sans-I/O: ``vhost_user.codec`` and
``vhost_user.session`` turn front-end messages into actions, ``virtq`` walks
split rings over guest memory with every guest-written value checked, and
``vsock.core`` runs the connections and their credit, talking to host sides only
through the ``endpoints.base.Peer`` interface. The I/O shell is thin: ``loop``
(one epoll, one thread), ``device`` (vhost-user socket, eventfds, mmap) and
``endpoints.sockets`` (hybrid unix and TCP). ``simguest`` is a Python front-end
plus guest driver used by tests, benchmarks and the demo.
"""

__version__ = "0.1.0"
