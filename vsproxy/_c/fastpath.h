/* The C fast path (vsproxy._fastpath): the types and functions Python calls (fastpath_cdef.h,
   which cffi reads too), and the values of their fields, as vsproxy/fastpath.py and
   vsproxy/taps.py name them (tests/test_c_headers.py checks that they agree). The cffi module
   includes this header; the C files include it through their own headers.

   The C code only reads: the avail ring entries, the descriptor chain of each head and its
   header, and only for the two chain shapes a Linux guest posts for data (an indirect table of
   [header, payload], or the same two descriptors chained directly). Everything it cannot vouch
   for is handed back as a "slow" item, which the Python walker (the reference) checks and
   handles. Every guest address is translated through the memory table (vq_mem, ring.h
   gpa_ptr) and bounds-checked as the walker checks it: the whole buffer inside one region.

   The files: tx_batch.c (the tx ring read in batches), tx_kick.c (a tx kick served without a
   turn through Python), rx_fill.c (host data into rx chains), own.c (the connections lent to C,
   own_*), capture.c (capture records), ring.h (virtqueue helpers); virtio_vsock.h and vsockmon.h
   mirror the Linux headers whose names they use. */
#ifndef VSPROXY_FASTPATH_H
#define VSPROXY_FASTPATH_H

#include <stdint.h>

#include "fastpath_cdef.h"

/* Functions one C file calls in another: not exported from the module (built with -fPIC), so
   calls to them are direct, and inlinable within their own file, as calls to static functions. */
#define VSP_INTERNAL __attribute__((visibility("hidden")))

/* vq_item.kind (fastpath.py: SLOW, CREDIT, TAIL; a run is 0) */
enum { ITEM_RUN = 0, ITEM_SLOW = 1, ITEM_CREDIT = 2, ITEM_TAIL = 3 };
/* vq_tx_ctx.seg_kind of a segment in the scratch buffer (fastpath.py SEG_SCRATCH); a segment
   in guest memory has the index of its region, below VQ_MAX_REGIONS */
enum { SEG_SCRATCH = 255 };
/* the regions of vq_mem (fastpath.py MAX_REGIONS, vhost_user/codec.py MAX_MEM_REGIONS) */
#define VQ_MAX_REGIONS 8
/* vq_cap.mode (taps.py: CAP_NONE, CAP_PCAP, CAP_PCAPNG) */
enum { CAP_NONE = 0, CAP_PCAP = 1, CAP_PCAPNG = 2 };
/* vq_own.flags */
enum { OWN_F_REQUESTED = 1, OWN_F_SELF = 2, OWN_F_WAIT = 4, OWN_F_TX = 8 };
/* vq_own.release: why C gave the connection back (0: it did not; fastpath.py OWN_TAKEN) */
enum { OWN_GUEST = 1, OWN_EOF = 2, OWN_ERROR = 3, OWN_SLOW = 4, OWN_LIMIT = 5, OWN_ALL = 6, OWN_BLOCKED = 7 };
/* vq_rx_result.status */
enum { RX_LIMIT = 0, RX_SLOW = 1, RX_AGAIN = 2, RX_EOF = 3, RX_ERROR = 4, RX_SHORT = 5 };
/* what vq_tx_kick returns */
enum { KICK_DONE = 0, KICK_ITEMS = 1, KICK_PUMP = 2 };
/* what vq_own_fill returns */
enum { FILL_WAIT_GUEST = 0, FILL_WAIT_HOST = 1, FILL_BACK = -1 };

#endif
