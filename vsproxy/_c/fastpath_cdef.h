/* The C fast path's interface to Python: the types and functions vsproxy.fastpath uses.
   setup.py hands this file's text to cffi's cdef() as it is, and fastpath.h includes it for
   the compiler: so it holds C declarations and comments only, no preprocessor lines. The
   values of the fields (kinds, flags, statuses) are named in fastpath.h. */

/* Guest memory as the C paths see it: the regions of the vhost-user memory table, each mapped
   (vsproxy/memory.py). A guest address is good only if the whole buffer lies inside one region
   (GuestMemory.gpa_view): ring.h gpa_ptr looks it up, the region the last lookup hit first. */
typedef struct {
    uint8_t *base;       /* the region's mapping */
    uint64_t gpa, size;  /* its guest-physical range */
} vq_region;

typedef struct {
    vq_region r[8];      /* vhost-user's VHOST_MEMORY_BASELINE_NREGIONS (codec.MAX_MEM_REGIONS) */
    uint32_t n;          /* regions in use, 1..8, their guest ranges disjoint */
    uint32_t last;       /* the region the last lookup hit (< n) */
} vq_mem;
typedef struct {
    uint32_t kind;       /* ITEM_RUN: RW run, ITEM_SLOW: slow chain for Python, ITEM_CREDIT: header-only
                            CREDIT_UPDATE/REQUEST, ITEM_TAIL: the unsent tail of a run C took for an
                            owned connection (OWN_F_TX): received and counted already, Python
                            queues it for the peer */
    uint32_t chain;      /* index of the first chain (in heads) */
    uint32_t nchains;    /* chains in the run */
    uint32_t src_port;
    uint32_t dst_port;
    uint64_t dst_cid;
    uint32_t buf_alloc;  /* credit fields of the run's last packet */
    uint32_t fwd_cnt;
    uint32_t total;      /* payload bytes in the run */
    uint32_t seg_first;
    uint32_t nseg;
    uint32_t cap_off;    /* where the run's capture records start in the capture buffer */
    uint32_t cap_rec;    /* the capture records before them (vq_cap.records then) */
    uint32_t marked;     /* its records carry the connection's capture comment (C ran it) */
    uint16_t op;         /* kind 2: the op and the type of the packet; a run or tail: its type
                            (SEQPACKET: each packet one segment, its flags in seg_flags) */
    uint16_t type;
} vq_item;

typedef struct {
    uint8_t *buf;        /* capture records are appended here, formatted for the file */
    uint32_t size;
    uint32_t used;
    uint32_t mode;       /* CAP_NONE, CAP_PCAP (classic pcap), CAP_PCAPNG */
    uint32_t iface;      /* pcapng interface id of the device */
    uint64_t ts_us;      /* timestamp of every record of this call, microseconds */
    uint32_t records;
    uint32_t dropped;    /* out: packets C handled with no room for their record (counted, not written) */
    uint32_t snaplen;    /* payload bytes a record keeps at most (0: all of it), as tcpdump -s */
} vq_cap;

/* A connection C runs between Python's turns (see fastpath.TxFastPath.own): its
   CREDIT_UPDATEs are taken in vq_tx_batch, which reads the host socket into the rx ring at
   once; with OWN_F_TX, its RW packets are sent to the host socket from C too, and C sends
   the guest the CREDIT_UPDATEs they make due. Python's state is the truth; this is lent. */
typedef struct {
    uint64_t peer_cid; uint32_t guest_port, peer_port, type;   /* the key, as the guest sends it */
    int32_t fd;
    uint32_t tx_cnt, peer_buf_alloc, peer_fwd_cnt;
    uint8_t hdr[44];       /* RW header to the guest; len and fwd_cnt are patched per packet */
    uint32_t flags;        /* OWN_F_REQUESTED: credit was asked for; OWN_F_SELF: updates unasked;
                              OWN_F_WAIT: the window is open and C waits for the host socket;
                              OWN_F_TX: C takes the guest's data too */
    uint32_t buf_alloc, rx_cnt, fwd_cnt, adv_fwd_cnt, ahead;   /* guest -> host credit (Credit) */
    uint32_t active;       /* 1 while C runs it */
    uint32_t release;      /* 0, or why C gave it back (OWN_*) */
    int32_t err;
    uint32_t updates;      /* every CREDIT_UPDATE C took: Python sees progress by it */
    uint32_t credit_items, packets;   /* counts Python has not folded into its own yet */
    uint64_t bytes;
    uint32_t tx_packets, updates_sent, sends;   /* RW packets taken, CREDIT_UPDATEs written, runs sent */
    uint64_t tx_bytes;
    uint64_t ra_bytes;     /* host bytes read ahead into reserved rx chains */
    /* Read-ahead (own_reserve): rx chains C took from the avail ring while the guest's window
       was shut and read host bytes into, not yet published; [rs_first, rs_n) still held, in
       order, each with its buffer and its payload length. */
    uint32_t rs_first, rs_n;
    uint16_t rs_head[64];
    uint32_t rs_len[64];
    uint8_t *rs_buf[64];   /* each held chain's buffer, in the region its address lies in */
    uint8_t *ra;           /* what C gives back: the held bytes, copied out (ra_len), for Python */
    uint32_t ra_len;
    const uint8_t *comment;   /* the capture comment of its packets (the connection's mark), or 0 */
    uint32_t comment_len;
} vq_own;

/* What stays the same from one vq_tx_batch call to the next, set once per queue. */
typedef struct {
    vq_mem *mem;         /* guest memory (the rx queue C fills is in the same) */
    const uint8_t *desc; const uint16_t *avail; uint32_t num;
    int indirect_ok; uint64_t guest_cid;
    uint16_t *heads; vq_item *items; uint32_t max_items;
    uint8_t *scratch; uint32_t scratch_size;
    uint8_t *seg_kind;   /* per segment: the memory region its bytes lie in, or SEG_SCRATCH */
    uint64_t *seg_off; uint32_t *seg_len; uint32_t max_segs;   /* offset in the region (or scratch) */
    uint32_t *seg_flags; /* per segment of a SEQPACKET run: its packet's flags (SEQ_EOM, SEQ_EOR) */
    uint32_t taken;      /* out: chains taken by the last call */
    /* owned connections, and the rx queue C fills for them (same guest memory) */
    vq_own *own; uint32_t nown;
    uint32_t owned;      /* entries active */
    uint32_t own_ok;     /* 0 while a per-packet tap is attached: C then only gives back */
    vq_cap *cap;         /* where C writes the capture records of what it does (mode CAP_NONE: none) */
    uint32_t released;   /* out: entries this call gave back */
    uint32_t waits;      /* out: entries that began waiting for their host socket (OWN_F_WAIT) */
    uint16_t *consumed; uint32_t nconsumed;   /* out: heads of chains C handled entirely */
    const uint8_t *rx_desc; const uint16_t *rx_avail; uint32_t *rx_used; uint16_t *rx_used_idx_p;
    uint32_t rx_num; int rx_event_idx; int rx_call_fd; uint32_t rx_burst, rx_max_packets;
    uint16_t rx_last_avail, rx_used_idx, rx_signalled;   /* Python's shadows, in and out */
    uint32_t rx_chains, rx_notifications;                /* out: added by this call */
    /* the tx queue's used side, for vq_tx_kick */
    uint32_t *tx_used; uint16_t *tx_used_idx_p; uint16_t *tx_avail_event_p; int tx_event_idx;
    int tx_call_fd, kick_fd; uint32_t limit;
    uint32_t spin_ns;    /* how long vq_tx_kick watches the avail ring before it re-enables kicks */
    /* --busy-poll (tx_kick.c): how long vq_tx_kick polls for the next turn of the connections it
       runs (the guest's next tx entry, or their host sockets) before it re-enables kicks (0:
       never); the adaptive window; calls since it closed; a probe's window is open; what polling
       cost and caught */
    uint32_t poll_ns, poll_cur, poll_calls, poll_probe;
    uint64_t poll_spent_ns, poll_hits, poll_misses;
    uint16_t tx_last_avail, tx_used_idx, tx_signalled;   /* Python's shadows, in and out */
    uint32_t tx_chains, tx_notifications;                /* out: added by vq_tx_kick */
    int32_t kick_items;  /* out: items of the batch vq_tx_kick left for Python */
} vq_tx_ctx;

int vq_tx_batch(vq_tx_ctx *ctx, uint16_t last_avail, uint32_t n, vq_cap *cap);
int vq_own_fill(vq_tx_ctx *ctx, uint32_t slot);
int vq_tx_kick(vq_tx_ctx *ctx);
void vq_own_take(vq_tx_ctx *ctx, uint32_t slot);
void vq_own_free_ra(vq_own *e);

typedef struct {
    uint32_t packets;    /* rx chains filled and added to the used ring */
    uint32_t bytes;      /* payload bytes read from the socket */
    uint32_t status;     /* why it stopped, see RX_* */
    int32_t err;         /* errno for RX_ERROR */
} vq_rx_result;

int vq_rx_fill(vq_mem *mem, const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail, uint32_t avail_n,
               uint32_t *used_ring, uint16_t used_idx,
               int fd, uint32_t credit, uint32_t max_packets, const uint8_t *hdr,
               vq_rx_result *res, vq_cap *cap, const uint8_t *comment, uint32_t comment_len);

/* SEQPACKET: whole host messages (one recv each) into rx chains, SEQ_EOM on the last packet of
   each; a message that does not fit the chains and the credit, or is longer than msg_limit, is
   left on the socket for Python (RX_SLOW). */
int vq_rx_fill_seq(vq_mem *mem, const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail,
                   uint32_t avail_n, uint32_t *used_ring, uint16_t used_idx,
                   int fd, uint32_t credit, uint32_t max_packets, uint32_t msg_limit, const uint8_t *hdr,
                   vq_rx_result *res, vq_cap *cap, const uint8_t *comment, uint32_t comment_len);

int vq_rx_put(vq_mem *mem, const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail, uint32_t avail_n,
              uint32_t *used_ring, uint16_t used_idx, const uint8_t *hdr, vq_cap *cap);
