/* The simulated guest's C sender and receiver: the types and functions
   vsproxy/simguest/cblast.py uses. setup.py hands this file's text to cffi's cdef() as it is,
   and cblast.h includes it for the compiler: C declarations and comments only, no
   preprocessor lines. */

/* The simulated guest's side of a ring: word offsets into its memory, as SplitRing keeps them. */
typedef struct {
    uint32_t avail_idx_w, avail_ring_w, used_event_w, used_idx_w, used_ring_d, avail_event_w;
    uint32_t mask;
    uint16_t avail_idx, last_used, kicked_idx;
    int kick_fd, call_fd;
    uint8_t *inflight;   /* SplitRing.inflight */
} sg_ring;

typedef struct {
    sg_ring tx, rx;
    int event_idx;
    const uint32_t *rx_off;  /* memory offset of each rx head's buffer */
    uint16_t *free_heads;    /* tx heads prepared with the blast's table: a stack */
    uint32_t nfree;
    uint64_t guest_cid, peer_cid;
    uint32_t local_port, peer_port, type;
    uint32_t buf_alloc, tx_cnt, peer_buf_alloc, peer_fwd_cnt, plen;
    uint64_t to_send, sent;
    uint64_t tx_done, kicks, interrupts;
    uint8_t *headers;        /* the credit updates consumed, 44 bytes each, for received_raw */
    uint32_t nheaders, max_headers;
    int timeout_ms;
    int wait_fds[16];        /* call eventfds to wait on: the rings' and the retired ones, which a */
    uint32_t nwait;          /* back-end may still signal until it takes SET_VRING_CALL in */
} sg_blast_state;

int sg_blast(uint8_t *mem, sg_blast_state *s);

typedef struct {
    sg_ring rx, tx;
    int event_idx;
    const uint32_t *rx_off;
    uint32_t rx_payload;     /* payload room of each rx buffer */
    const uint16_t *ctl_heads;  /* tx heads written as one 44-byte direct descriptor each, */
    const uint32_t *ctl_off;    /* at these memory offsets: C sends CREDIT_UPDATEs in them */
    uint32_t nctl, ctl_used;
    uint64_t guest_cid, peer_cid;
    uint32_t local_port, peer_port, type;
    uint32_t buf_alloc, rx_cnt, fwd_cnt, last_fwd_cnt;
    uint64_t want, got, packets, kicks, interrupts;
    uint8_t *headers;
    uint32_t nheaders, max_headers;
    int timeout_ms;
    int wait_fds[16];
    uint32_t nwait;
} sg_drain_state;

int sg_drain(uint8_t *mem, sg_drain_state *s);
