/* The simulated guest's bulk sender (blast.c) and receiver (drain.c) in C, with sg_ring.c
   (vsproxy.simguest._cblast): a benchmark's guest, as a guest kernel runs them, so that a
   benchmark measures vsproxy rather than a Python guest. Test and benchmark code: it is not part
   of vsproxy's own fast path (vsproxy/_c). The cffi module includes this header. */
#ifndef VSPROXY_SIMGUEST_CBLAST_H
#define VSPROXY_SIMGUEST_CBLAST_H

#include <stdint.h>

#include "cblast_cdef.h"

/* what sg_blast and sg_drain return (cblast.py: SG_*) */
enum { SG_DONE = 0, SG_RX = 1, SG_TIMEOUT = 2, SG_BAD = 3, SG_HEADERS = 4, SG_CREDIT = 5, SG_READ = 6 };
/* sg_rtt's modes (cblast.py: RTT_*) */
enum { RTT_PING = 0, RTT_ECHO = 1, RTT_CONNECT = 2 };

#endif
