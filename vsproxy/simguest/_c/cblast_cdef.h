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

/* The simulated guest's request/response loop (rtt.c): one connection, `size` bytes each way
   per round, in tx chains Python lends (tx_heads, written as header + payload descriptors, the
   header at tx_off[k] and the payload 64 bytes after it; a CONNECT lends header-only chains).
   mode RTT_PING sends, waits for the answer and records each round's ns in times; ECHO
   waits, then answers; CONNECT sends one REQUEST and waits for RESPONSE or RST (last_op). The
   phase is kept across calls: Python handles what C hands back and calls again. */
typedef struct {
    sg_ring rx, tx;
    int event_idx;
    const uint32_t *rx_off;
    uint32_t rx_payload;
    const uint16_t *tx_heads;
    const uint32_t *tx_off;
    uint8_t *tx_busy;        /* per lent chain: 1 while posted and not used yet */
    uint32_t ntx;
    uint64_t guest_cid, peer_cid;
    uint32_t local_port, peer_port, type;
    uint32_t buf_alloc, tx_cnt, peer_buf_alloc, peer_fwd_cnt, rx_cnt, fwd_cnt, last_fwd_cnt;
    uint32_t size, mode, phase, got;
    uint64_t rounds, done, t0;
    uint64_t *times;
    uint64_t kicks, interrupts, posted;
    uint16_t last_op;
    uint8_t *headers;
    uint32_t nheaders, max_headers;
    int timeout_ms;
    int wait_fds[16];
    uint32_t nwait;
} sg_rtt_state;

int sg_rtt(uint8_t *mem, sg_rtt_state *s);

/* The sender of recorded payload (send.c, guest replay): npkts packets, each lens[i] bytes read
   from fd at offs[i] into a lent tx chain (the header at tx_off[k], the payload 64 bytes after
   it, the payload descriptor's length at len_off[k]; slot_of maps a head to its k; free_k the
   lent chains not in flight, a stack) and sent as RW with flags[i], within the peer's credit.
   A packet the credit does not hold is sent in parts (part: its bytes sent so far, kept across
   calls). SG_READ: a read failed (err: its errno, 0 for a short read). */
typedef struct {
    sg_ring rx, tx;
    int event_idx;
    const uint32_t *rx_off;
    const uint16_t *tx_heads;
    const uint32_t *tx_off;
    const uint32_t *len_off;
    uint8_t *tx_busy;
    const uint32_t *slot_of;
    uint32_t *free_k;
    uint32_t ntx, nfree;
    uint64_t guest_cid, peer_cid;
    uint32_t local_port, peer_port, type;
    uint32_t buf_alloc, tx_cnt, peer_buf_alloc, peer_fwd_cnt, fwd_cnt;
    int fd;
    const uint64_t *offs;
    const uint32_t *lens;
    const uint32_t *flags;
    uint64_t npkts, sent, bytes, tx_done;
    uint32_t part;
    uint64_t kicks, interrupts;
    uint8_t *headers;
    uint32_t nheaders, max_headers;
    int err;
    int timeout_ms;
    int wait_fds[16];
    uint32_t nwait;
} sg_send_state;

int sg_send(uint8_t *mem, sg_send_state *s);

/* Host-side latency tools (lat.c), each a blocking C loop on one socket, for the benchmark's
   floors and host ends; they return 0 or an errno. lat_ping: n rounds of `size` bytes out and
   back, each round's ns in times. lat_echo / lat_relay: answer (or pass on both ways) n
   rounds or until EOF, counting them. lat_connect: n unix connect()s to path, each until the acceptor's one
   byte (hello) or EOF came back. lat_accept: n accept()s, each answered with a byte if hello,
   then closed. */
int lat_ping(int fd, uint64_t n, uint32_t size, uint64_t *times);
int lat_echo(int fd, uint64_t n, uint32_t size, uint64_t *rounds);
int lat_relay(int a, int b, uint64_t n, uint32_t size, uint64_t *rounds);
int lat_connect(const char *path, uint64_t n, uint64_t *times);
int lat_accept(int lfd, uint64_t n, int hello);
