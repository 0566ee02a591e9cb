"""Nitro Enclave emulation: EIF files (``eif``: build, read, measure) and ``vsproxy enclave run``
(``run``: vsproxy with what an enclave needs, and QEMU's nitro-enclave machine on its socket)."""
