"""cffi builder for the tx hot loop (``vsproxy._fastpath``), built by setup.py when a C
compiler and the Python headers are there; vsproxy runs without it (pure Python).

The C code only reads: the avail ring entries, the descriptor chain of each head and its
header, and only for the two chain shapes a Linux guest posts for data (an indirect table of
[header, payload], or the same two descriptors chained directly). Everything it cannot
vouch for is handed back as a "slow" item, which the Python walker (the reference) checks
and handles. Every address is bounds-checked against the single memory region.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
typedef struct {
    uint32_t kind;       /* 0: RW run, 1: slow chain for Python, 2: header-only CREDIT_UPDATE/REQUEST,
                            3: the unsent tail of a run C took for an owned connection (OWN_F_TX):
                            received and counted already, Python queues it for the peer */
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
    uint16_t op;         /* kind 2: the op and the type of the packet */
    uint16_t type;
} vq_item;

typedef struct {
    uint8_t *buf;        /* capture records are appended here, formatted for the file */
    uint32_t size;
    uint32_t used;
    uint32_t mode;       /* 0: no capture, 1: classic pcap, 2: pcapng */
    uint32_t iface;      /* pcapng interface id of the device */
    uint64_t ts_us;      /* timestamp of every record of this call, microseconds */
    uint32_t records;
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
       order, each with its buffer's offset in the region and its payload length. */
    uint32_t rs_first, rs_n;
    uint16_t rs_head[64];
    uint32_t rs_len[64];
    uint64_t rs_off[64];
    uint8_t *ra;           /* what C gives back: the held bytes, copied out (ra_len), for Python */
    uint32_t ra_len;
} vq_own;

/* What stays the same from one vq_tx_batch call to the next, set once per queue. */
typedef struct {
    const uint8_t *base; uint64_t region_gpa, region_size;
    const uint8_t *desc; const uint16_t *avail; uint32_t num;
    int indirect_ok; uint64_t guest_cid;
    uint16_t *heads; vq_item *items; uint32_t max_items;
    uint8_t *scratch; uint32_t scratch_size;
    uint8_t *seg_kind; uint64_t *seg_off; uint32_t *seg_len; uint32_t max_segs;
    uint32_t taken;      /* out: chains taken by the last call */
    /* owned connections, and the rx queue C fills for them (same memory region) */
    vq_own *own; uint32_t nown;
    uint32_t owned;      /* entries active */
    uint32_t own_ok;     /* 0 while anything is captured or tapped: C then only gives back */
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

int vq_rx_fill(const uint8_t *base, uint64_t region_gpa, uint64_t region_size,
               const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail, uint32_t avail_n,
               uint32_t *used_ring, uint16_t used_idx,
               int fd, uint32_t credit, uint32_t max_packets, const uint8_t *hdr,
               vq_rx_result *res, vq_cap *cap);

int vq_rx_put(uint8_t *base, uint64_t region_gpa, uint64_t region_size,
              const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail, uint32_t avail_n,
              uint32_t *used_ring, uint16_t used_idx, const uint8_t *hdr, vq_cap *cap);

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
"""

# The C source starts with CDEF itself, so the types and prototypes are written once.
SOURCE = "#include <stdint.h>\n#include <string.h>\n#include <unistd.h>\n" + CDEF + r"""

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define HDR 44
#define MAX_PKT 65536
#define COPY_MAX 1024   /* payloads up to this size are copied into scratch, merged per run */

/* Capture records, laid out as vsproxy/capture/format.py writes them: af_vsockmon_hdr
   (include/uapi/linux/vsockmon.h), the 44-byte virtio header, the RW payload; wrapped in a
   classic pcap record header or a pcapng Enhanced Packet Block with epb_flags. */
#define MON 32
#define CAP_PCAP 1
#define CAP_PCAPNG 2

static inline uint32_t cap_record_size(const vq_cap *cap, uint32_t plen) {
    uint32_t frame = MON + HDR + plen;
    if (cap->mode == CAP_PCAP) return 16 + frame;
    /* EPB: 28 fixed + frame padded to 4 + epb_flags option (8) + end of options (4) + trailing length */
    return 28 + ((frame + 3) & ~3u) + 8 + 4 + 4;
}

static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* Writes one record: h is the header as vsproxy read it (never re-read from guest memory). */
static void cap_record(vq_cap *cap, const uint8_t *h, const uint8_t *payload, uint32_t plen, int inbound) {
    uint8_t *p = cap->buf + cap->used;
    uint32_t frame = MON + HDR + plen, rec = cap_record_size(cap, plen);
    uint8_t *f;
    if (cap->mode == CAP_PCAP) {
        put32(p, (uint32_t)(cap->ts_us / 1000000)); put32(p + 4, (uint32_t)(cap->ts_us % 1000000));
        put32(p + 8, frame); put32(p + 12, frame);
        f = p + 16;
    } else {
        put32(p, 6); put32(p + 4, rec); put32(p + 8, cap->iface);
        put32(p + 12, (uint32_t)(cap->ts_us >> 32)); put32(p + 16, (uint32_t)cap->ts_us);
        put32(p + 20, frame); put32(p + 24, frame);
        f = p + 28;
        uint8_t *o = f + ((frame + 3) & ~3u);
        memset(f + frame, 0, ((frame + 3) & ~3u) - frame);
        put32(o, 2 | (4u << 16)); put32(o + 4, inbound ? 1 : 2); put32(o + 8, 0);
        put32(o + 12, rec);
    }
    /* af_vsockmon_hdr: cids and ports from the virtio header, transport VIRTIO (2), and the op
       as Linux maps it: RW is PAYLOAD (4), CREDIT_UPDATE and CREDIT_REQUEST are CONTROL (3) */
    memcpy(f, h, 24);  /* src_cid, dst_cid (le64), src_port, dst_port (le32): same offsets */
    uint16_t vop;
    memcpy(&vop, h + 30, 2);
    /* virtio_transport_build_skb: REQUEST/RESPONSE CONNECT, RST/SHUTDOWN DISCONNECT, RW PAYLOAD,
       CREDIT_UPDATE/REQUEST CONTROL, anything else UNKNOWN */
    static const uint16_t mon_op[8] = {0, 1, 1, 2, 2, 4, 3, 3};
    uint16_t op = vop < 8 ? mon_op[vop] : 0, tr = 2, tl = HDR, z = 0;
    memcpy(f + 24, &op, 2); memcpy(f + 26, &tr, 2); memcpy(f + 28, &tl, 2); memcpy(f + 30, &z, 2);
    memcpy(f + MON, h, HDR);
    memcpy(f + MON + HDR, payload, plen);
    cap->used += rec;
    cap->records++;
}

static inline int in_region(uint64_t addr, uint64_t len, uint64_t gpa, uint64_t size) {
    return addr >= gpa && len <= size && addr - gpa <= size - len;
}

static inline void rd_desc(const uint8_t *p, uint64_t *addr, uint32_t *len, uint16_t *flags, uint16_t *next) {
    memcpy(addr, p, 8); memcpy(len, p + 8, 4); memcpy(flags, p + 12, 2); memcpy(next, p + 14, 2);
}

enum { OWN_F_REQUESTED = 1, OWN_F_SELF = 2, OWN_F_WAIT = 4, OWN_F_TX = 8 };
enum { OWN_GUEST = 1, OWN_EOF = 2, OWN_ERROR = 3, OWN_SLOW = 4, OWN_LIMIT = 5, OWN_ALL = 6, OWN_BLOCKED = 7 };
enum { ITEM_RUN = 0, ITEM_SLOW = 1, ITEM_CREDIT = 2, ITEM_TAIL = 3 };
/* The guest's window of e is shut: as much in flight as it allows, or a fwd_cnt claiming more
   than it could have consumed (Credit.peer_free gives such a guest no credit either) */
static inline int own_shut(const vq_own *e) {
    return e->tx_cnt - e->peer_fwd_cnt >= e->peer_buf_alloc;
}
static void own_unreserve(vq_tx_ctx *ctx, vq_own *e);
static void own_release(vq_tx_ctx *ctx, vq_own *e, uint32_t why) {
    own_unreserve(ctx, e);
    e->active = 0; e->release = why; ctx->owned--; ctx->released++;
}
static vq_own *own_find(vq_tx_ctx *ctx, uint16_t type, uint32_t src_port, uint64_t dst_cid, uint32_t dst_port) {
    for (uint32_t k = 0, seen = 0; k < ctx->nown && seen < ctx->owned; k++) {
        vq_own *e = &ctx->own[k];
        if (!e->active) continue;
        seen++;
        if (e->type == type && e->guest_port == src_port && e->peer_cid == dst_cid && e->peer_port == dst_port)
            return e;
    }
    return 0;
}
static void own_release_all(vq_tx_ctx *ctx) {
    for (uint32_t k = 0; k < ctx->nown && ctx->owned; k++)
        if (ctx->own[k].active) own_release(ctx, &ctx->own[k], OWN_ALL);
}
static void own_credit(vq_tx_ctx *ctx, vq_own *e, uint32_t buf_alloc, uint32_t fwd_cnt);
static int own_tx_run(vq_tx_ctx *ctx, vq_own *e, vq_item *run);

/* Returns the number of items; heads[0..ctx->taken) are the chains taken. */
int vq_tx_batch(vq_tx_ctx *ctx, uint16_t last_avail, uint32_t n, vq_cap *cap)
{
    const uint8_t *base = ctx->base; uint64_t region_gpa = ctx->region_gpa, region_size = ctx->region_size;
    const uint8_t *desc = ctx->desc; const uint16_t *avail = ctx->avail; uint32_t num = ctx->num;
    int indirect_ok = ctx->indirect_ok; uint64_t guest_cid = ctx->guest_cid;
    uint16_t *heads = ctx->heads; vq_item *items = ctx->items; uint32_t max_items = ctx->max_items;
    uint8_t *scratch = ctx->scratch; uint32_t scratch_size = ctx->scratch_size;
    uint8_t *seg_kind = ctx->seg_kind; uint64_t *seg_off = ctx->seg_off; uint32_t *seg_len = ctx->seg_len;
    uint32_t max_segs = ctx->max_segs;
    uint32_t *taken = &ctx->taken;
    uint32_t nitems = 0, nseg = 0, scratch_used = 0;
    int seen_fast = 0, seen_slow = 0;
    vq_item *run = 0;
    vq_own *run_e = 0;          /* the owned connection whose run C takes itself (OWN_F_TX), or 0 */
    uint32_t run_scratch = 0;   /* scratch_used when the run began */
    /* A run C takes is sent when it ends (its item is always the last one then); done with,
       its chains are consumed and its item, segments and scratch are free again. */
#define CLOSE_RUN() do { \
        if (run && run_e && run_e->active && own_tx_run(ctx, run_e, run)) { \
            for (uint32_t k_ = 0; k_ < run->nchains; k_++) ctx->consumed[ctx->nconsumed++] = heads[run->chain + k_]; \
            nseg = run->seg_first; scratch_used = run_scratch; nitems--; \
        } \
        run = 0; run_e = 0; \
    } while (0)
    *taken = n;
    ctx->released = ctx->nconsumed = ctx->rx_chains = ctx->rx_notifications = ctx->waits = 0;
    for (uint32_t i = 0; i < n; i++) {
        /* one aligned 16-bit load per avail entry */
        uint16_t head = __atomic_load_n(&avail[2 + ((uint16_t)(last_avail + i) & (num - 1))], __ATOMIC_ACQUIRE);
        heads[i] = head;
        int fast = 0, credit_only = 0;
        uint64_t ha = 0, pa = 0; uint32_t hl = 0, pl = 0;
        if (head < num) {
            uint64_t a; uint32_t l; uint16_t f, nx;
            rd_desc(desc + 16 * (uint64_t)head, &a, &l, &f, &nx);
            if (f == 0 && l == HDR) {
                /* a header alone in one descriptor: how Linux sends control packets */
                ha = a; hl = l; credit_only = 1; fast = 1;
            } else if (f == F_INDIRECT && indirect_ok && l == 32 && in_region(a, 32, region_gpa, region_size)) {
                uint64_t a0, a1; uint32_t l0, l1; uint16_t f0, f1, n0, n1;
                const uint8_t *t = base + (a - region_gpa);
                rd_desc(t, &a0, &l0, &f0, &n0);
                rd_desc(t + 16, &a1, &l1, &f1, &n1);
                if (f0 == F_NEXT && n0 == 1 && f1 == 0) { ha = a0; hl = l0; pa = a1; pl = l1; fast = 1; }
            } else if (f == F_NEXT && nx < num && nx != head) {
                uint64_t a1; uint32_t l1; uint16_t f1, n1;
                rd_desc(desc + 16 * (uint64_t)nx, &a1, &l1, &f1, &n1);
                if (f1 == 0) { ha = a; hl = l; pa = a1; pl = l1; fast = 1; }
            }
        }
        uint8_t h[HDR];
        uint32_t plen = 0;
        if (fast) {
            fast = hl == HDR && in_region(ha, HDR, region_gpa, region_size)
                   && (credit_only || (pl > 0 && in_region(pa, pl, region_gpa, region_size)));
        }
        uint16_t type = 0, op = 0;
        if (fast) {
            memcpy(h, base + (ha - region_gpa), HDR);
            uint64_t src_cid;
            memcpy(&src_cid, h, 8); memcpy(&plen, h + 24, 4); memcpy(&type, h + 28, 2); memcpy(&op, h + 30, 2);
            if (credit_only)
                fast = src_cid == guest_cid && (type == 1 || type == 2) && (op == 6 || op == 7) && plen == 0;
            else
                fast = src_cid == guest_cid && type == 1 && op == 5 && plen > 0 && plen <= pl && plen <= MAX_PKT;
        }
        if (fast && nseg + 1 > max_segs) fast = 0;
        if (fast && cap->mode && cap->used + cap_record_size(cap, plen) > cap->size) {
            /* capture buffer full: end the batch here (the chain stays on the ring) */
            if (i > 0) { *taken = i; break; }
            fast = 0;
        }
        /* Capturing, the records written here land before any record Python writes for the
           batch's slow chains; so that the capture keeps ring order, a batch is either slow
           chains only, or fast chains followed by at most one slow chain. */
        if (fast && cap->mode && seen_slow) { *taken = i; break; }
        if (!fast) {
            CLOSE_RUN();
            if (nitems == max_items) return -1;
            /* C cannot tell whose it is: every owned connection goes back to Python first */
            if (ctx->owned) own_release_all(ctx);
            vq_item *it = &items[nitems++];
            memset(it, 0, sizeof *it);
            it->kind = ITEM_SLOW; it->chain = i; it->nchains = 1;
            seen_slow = 1;
            if (cap->mode && seen_fast) { *taken = i + 1; break; }
            continue;
        }
        seen_fast = 1;
        uint64_t dst_cid; uint32_t src_port, dst_port, buf_alloc, fwd_cnt;
        memcpy(&dst_cid, h + 8, 8); memcpy(&src_port, h + 16, 4); memcpy(&dst_port, h + 20, 4);
        memcpy(&buf_alloc, h + 36, 4); memcpy(&fwd_cnt, h + 40, 4);
        vq_own *tx_e = 0;
        if (ctx->owned) {
            vq_own *e = own_find(ctx, type, src_port, dst_cid, dst_port);
            if (e && credit_only && op == 6 && ctx->own_ok) {
                CLOSE_RUN();  /* the run before it may be this connection's, and give it back */
                if (e->active) {
                    own_credit(ctx, e, buf_alloc, fwd_cnt);
                    ctx->consumed[ctx->nconsumed++] = head;
                    continue;
                }
            } else if (e && !credit_only && (e->flags & OWN_F_TX) && ctx->own_ok) {
                tx_e = e;                           /* its data C sends itself */
            } else if (e) {
                own_release(ctx, e, OWN_GUEST);     /* anything else on it is Python's */
            }
        }
        if (credit_only) {
            CLOSE_RUN();
            /* an item of its own, between runs: the credit it carries applies in ring order */
            if (nitems == max_items) return -1;
            vq_item *it = &items[nitems++];
            memset(it, 0, sizeof *it);
            it->kind = ITEM_CREDIT; it->chain = i; it->nchains = 1; it->src_port = src_port; it->dst_port = dst_port;
            it->dst_cid = dst_cid; it->buf_alloc = buf_alloc; it->fwd_cnt = fwd_cnt; it->op = op; it->type = type;
            it->cap_off = cap->used;
            if (cap->mode) cap_record(cap, h, h, 0, 1);
            continue;
        }
        if (!run || run_e != tx_e || run->src_port != src_port || run->dst_port != dst_port
            || run->dst_cid != dst_cid) {
            CLOSE_RUN();
            if (nitems == max_items) return -1;
            run = &items[nitems++];
            run_e = tx_e; run_scratch = scratch_used;
            run->kind = ITEM_RUN; run->chain = i; run->nchains = 0; run->src_port = src_port; run->dst_port = dst_port;
            run->dst_cid = dst_cid; run->total = 0; run->seg_first = nseg; run->nseg = 0;
            run->cap_off = cap->used;
        }
        run->nchains++;
        run->buf_alloc = buf_alloc; run->fwd_cnt = fwd_cnt;
        run->total += plen;
        const uint8_t *payload = base + (pa - region_gpa);
        if (cap->mode) cap_record(cap, h, payload, plen, 1);
        if (plen <= COPY_MAX && scratch_used + plen <= scratch_size) {
            /* small payload: copy, and extend the previous scratch segment when adjacent */
            memcpy(scratch + scratch_used, payload, plen);
            if (run->nseg && seg_kind[nseg - 1] == 1 && seg_off[nseg - 1] + seg_len[nseg - 1] == scratch_used) {
                seg_len[nseg - 1] += plen;
            } else {
                seg_kind[nseg] = 1; seg_off[nseg] = scratch_used; seg_len[nseg] = plen; nseg++; run->nseg++;
            }
            scratch_used += plen;
        } else {
            seg_kind[nseg] = 0; seg_off[nseg] = pa - region_gpa; seg_len[nseg] = plen; nseg++; run->nseg++;
        }
    }
    CLOSE_RUN();
#undef CLOSE_RUN
    return (int)nitems;
}

#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>


enum { RX_LIMIT = 0, RX_SLOW = 1, RX_AGAIN = 2, RX_EOF = 3, RX_ERROR = 4, RX_SHORT = 5 };

/* Host data straight from a socket into rx chains of the one shape Linux posts (a single
   writable descriptor inside the region). Stops at the first chain of any other shape
   (RX_SLOW, left on the ring for Python), when the socket has no more (RX_AGAIN, or RX_SHORT
   after a short read), at EOF or an error (RX_EOF, RX_ERROR), or at the credit / packet limit
   (RX_LIMIT). One recvmsg fills up to RX_IOV chains: Linux posts 3776-byte buffers, and a
   syscall per buffer would cost more than the copy. Used elements are written; Python
   publishes used->idx and advances its indices. */
/* Avail entry idx, if it names a chain of the Linux rx shape: one writable descriptor inside
   the region with room for more than a header. Its head, guest address and length; 0 if not. */
static inline int rx_linux_chain(const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t idx,
                                 uint64_t region_gpa, uint64_t region_size, uint16_t *head, uint64_t *addr,
                                 uint32_t *len) {
    uint16_t h = __atomic_load_n(&avail[2 + (idx & (num - 1))], __ATOMIC_ACQUIRE);
    if (h >= num) return 0;
    uint64_t a; uint32_t l; uint16_t f, nx;
    rd_desc(desc + 16 * (uint64_t)h, &a, &l, &f, &nx);
    if (f != F_WRITE || l <= HDR || !in_region(a, l, region_gpa, region_size)) return 0;
    *head = h; *addr = a; *len = l;
    return 1;
}

#define RX_IOV 64
int vq_rx_fill(const uint8_t *base_, uint64_t region_gpa, uint64_t region_size,
               const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail, uint32_t avail_n,
               uint32_t *used_ring, uint16_t used_idx,
               int fd, uint32_t credit, uint32_t max_packets, const uint8_t *hdr,
               vq_rx_result *res, vq_cap *cap)
{
    uint8_t *base = (uint8_t *)base_;  /* guest memory, writable: the tx context keeps it const */
    res->packets = 0; res->bytes = 0; res->status = RX_LIMIT; res->err = 0;
    while (res->packets < max_packets && credit > 0) {
        struct iovec iov[RX_IOV];
        uint16_t heads[RX_IOV];
        uint32_t m = 0, cap_need = cap->used;
        uint64_t want = 0;
        int slow = 0;
        /* the next chains, each checked, within the credit and the capture buffer */
        while (m < RX_IOV && res->packets + m < max_packets && want < credit) {
            if (res->packets + m >= avail_n) { slow = 1; break; }
            uint16_t head; uint64_t a; uint32_t l;
            if (!rx_linux_chain(desc, avail, num, (uint16_t)(last_avail + res->packets + m), region_gpa, region_size,
                                &head, &a, &l)) { slow = 1; break; }
            uint32_t room = l - HDR;
            if (room > MAX_PKT) room = MAX_PKT;
            if (room > credit - want) room = (uint32_t)(credit - want);
            if (cap->mode) {
                if (cap_need + cap_record_size(cap, room) > cap->size) break;
                cap_need += cap_record_size(cap, room);
            }
            iov[m].iov_base = base + (a - region_gpa) + HDR;
            iov[m].iov_len = room;
            heads[m] = head;
            want += room;
            m++;
        }
        if (m == 0) { res->status = slow ? RX_SLOW : RX_LIMIT; return 0; }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov; msg.msg_iovlen = m;
        ssize_t n;
        do n = recvmsg(fd, &msg, MSG_DONTWAIT); while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) { res->status = RX_AGAIN; return 0; }
            res->status = RX_ERROR; res->err = errno; return 0;
        }
        if (n == 0) { res->status = RX_EOF; return 0; }
        /* the bytes fill the chains in order: one packet per chain they reached */
        uint64_t left = (uint64_t)n;
        for (uint32_t k = 0; k < m && left; k++) {
            uint32_t len = left < iov[k].iov_len ? (uint32_t)left : (uint32_t)iov[k].iov_len;
            uint8_t *buf = (uint8_t *)iov[k].iov_base - HDR;
            memcpy(buf, hdr, HDR);
            memcpy(buf + 24, &len, 4);
            if (cap->mode) {
                uint8_t h[HDR];
                memcpy(h, hdr, HDR);
                memcpy(h + 24, &len, 4);
                cap_record(cap, h, buf + HDR, len, 0);
            }
            uint32_t slot = (uint16_t)(used_idx + res->packets) & (num - 1);
            used_ring[2 * slot] = heads[k];
            used_ring[2 * slot + 1] = HDR + len;
            res->packets++;
            res->bytes += len;
            credit -= len;
            left -= len;
        }
        if ((uint64_t)n < want) { res->status = RX_SHORT; return 0; }
        if (slow) { res->status = RX_SLOW; return 0; }
    }
    return 0;
}

/* used->idx published, and the guest interrupted if it asked (as SplitQueue.publish).
   Returns 1 if it was interrupted. */
static int ring_publish(uint16_t *used_idx_p, const uint16_t *avail, uint32_t num, int event_idx, int call_fd,
                        uint16_t new_idx, uint16_t *signalled) {
    uint16_t old = *signalled;
    if (new_idx == old) return 0;
    __atomic_store_n(used_idx_p, new_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *signalled = new_idx;
    int need;
    if (event_idx) {
        uint16_t ev = __atomic_load_n(&avail[2 + num], __ATOMIC_ACQUIRE);
        need = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old);
    } else {
        need = !(__atomic_load_n(&avail[0], __ATOMIC_ACQUIRE) & 1);
    }
    if (need) {
        uint64_t one = 1;
        ssize_t w = write(call_fd, &one, 8);  /* EAGAIN: the counter is full, an interrupt is pending */
        (void)w;
    }
    return need;
}

/* rx chains the guest made available to C, or 0 when there are none or the index jumped
   (Python's walker then looks at the ring) */
static uint32_t own_rx_avail(const vq_tx_ctx *ctx) {
    uint16_t avail_idx = __atomic_load_n(&ctx->rx_avail[1], __ATOMIC_ACQUIRE);
    uint32_t n = (uint16_t)(avail_idx - ctx->rx_last_avail);
    return n > ctx->rx_num ? 0 : n;
}

static void own_publish(vq_tx_ctx *ctx) {
    ctx->rx_notifications += ring_publish(ctx->rx_used_idx_p, ctx->rx_avail, ctx->rx_num, ctx->rx_event_idx,
                                          ctx->rx_call_fd, ctx->rx_used_idx, &ctx->rx_signalled);
}

/* Read-ahead. While the guest's window of an owned connection is shut, C reads what its host
   socket holds into the next posted rx chains, without publishing them: the device owns a
   chain from when it is made available until it is used, so the bytes wait in the guest's own
   buffers (no copy of ours) and go out, header written and used entry added, the moment the
   guest's update opens the window. Meanwhile the host sender goes on writing. Without it, a
   sender whose socket buffer is smaller than the window (a unix socket's default, 212,992
   bytes, against Linux's 256 KiB) stalls every window, and vsproxy reads each window in two
   pieces after the guest's update. Bounded: one window (at most RA_MAX), at most half of the
   chains posted, RS_MAX chains, and all connections together at most half of the ring (the
   rest stay for control packets and the connections Python serves). */
#define RA_MAX (256 * 1024)
#define RS_MAX 64
#include <stdlib.h>
void vq_own_free_ra(vq_own *e) {
    free(e->ra);
    e->ra = 0;
    e->ra_len = 0;
}

/* The k-th avail chain past C's position, if it has the Linux shape (rx_linux_chain): its head
   and its buffer's offset in the region and length; 0 if not. */
static int own_rx_chain(const vq_tx_ctx *ctx, uint32_t k, uint16_t *head, uint64_t *off, uint32_t *len) {
    uint64_t a;
    if (!rx_linux_chain(ctx->rx_desc, ctx->rx_avail, ctx->rx_num, (uint16_t)(ctx->rx_last_avail + k),
                        ctx->region_gpa, ctx->region_size, head, &a, len))
        return 0;
    *off = a - ctx->region_gpa;
    return 1;
}

/* rx chains every connection C runs holds */
static uint32_t own_held(const vq_tx_ctx *ctx) {
    uint32_t held = 0;
    for (uint32_t k = 0, seen = 0; k < ctx->nown && seen < ctx->owned; k++) {
        const vq_own *e = &ctx->own[k];
        if (!e->active) continue;
        seen++;
        held += e->rs_n - e->rs_first;
    }
    return held;
}

static void own_reserve(vq_tx_ctx *ctx, vq_own *e) {
    if (e->rs_n) return;   /* one read-ahead per shut window */
    uint32_t n = own_rx_avail(ctx) / 2, held = own_held(ctx);
    if (held >= ctx->rx_num / 2) return;
    if (n > ctx->rx_num / 2 - held) n = ctx->rx_num / 2 - held;
    if (n > RS_MAX) n = RS_MAX;
    uint32_t cap = e->peer_buf_alloc < RA_MAX ? e->peer_buf_alloc : RA_MAX;
    if (n == 0 || cap == 0) return;
    /* room to copy the bytes out if C must give the connection back before they went */
    if (!e->ra && !(e->ra = malloc(RA_MAX))) return;
    struct iovec iov[RS_MAX];
    uint64_t want = 0;
    uint32_t m = 0;
    while (m < n && want < cap) {
        uint16_t head; uint64_t off; uint32_t l;
        if (!own_rx_chain(ctx, m, &head, &off, &l)) break;
        uint32_t room = l - HDR;
        if (room > MAX_PKT) room = MAX_PKT;
        if (room > cap - want) room = (uint32_t)(cap - want);
        iov[m].iov_base = (uint8_t *)ctx->base + off + HDR;
        iov[m].iov_len = room;
        e->rs_head[m] = head; e->rs_off[m] = off;
        want += room;
        m++;
    }
    if (m == 0) return;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov; msg.msg_iovlen = m;
    ssize_t got;
    do got = recvmsg(e->fd, &msg, MSG_DONTWAIT); while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            e->err = errno;
            own_release(ctx, e, OWN_ERROR);
        }
        return;
    }
    /* got == 0, EOF: nothing held; the socket says so again when C next reads it */
    uint64_t left = (uint64_t)got;
    uint32_t k = 0;
    for (; k < m && left; k++) {
        e->rs_len[k] = left < iov[k].iov_len ? (uint32_t)left : (uint32_t)iov[k].iov_len;
        left -= e->rs_len[k];
    }
    e->rs_first = 0; e->rs_n = k;
    ctx->rx_last_avail += k;   /* taken from the ring, in flight until used */
    e->ra_bytes += (uint64_t)got;
}

/* A chain to the used ring, with used_len bytes written into it */
static void own_put(vq_tx_ctx *ctx, uint16_t head, uint32_t used_len) {
    uint32_t slot = ctx->rx_used_idx & (ctx->rx_num - 1);
    ctx->rx_used[2 * slot] = head;
    ctx->rx_used[2 * slot + 1] = used_len;
    ctx->rx_used_idx++;
    ctx->rx_chains++;
}

/* The held chains go out as far as the credit goes (their bytes come before the socket's).
   Returns the bytes sent; *packets counts the chains. Where the credit ends inside a chain,
   the chain goes out with the part the credit allows and the rest of its bytes move into the
   next posted chain, which takes its place at the head of what is held; if there is no such
   chain, *stuck is set (C gives the connection back). */
static uint32_t own_deliver(vq_tx_ctx *ctx, vq_own *e, uint32_t credit, uint32_t *packets, int *stuck) {
    uint32_t bytes = 0;
    *stuck = 0;
    while (e->rs_first < e->rs_n && *packets < ctx->rx_max_packets && bytes < credit) {
        uint32_t i = e->rs_first, len = e->rs_len[i], send = len;
        uint8_t *buf = (uint8_t *)ctx->base + e->rs_off[i];
        uint16_t head = 0; uint64_t off = 0;
        if (len > credit - bytes) {
            send = credit - bytes;
            uint32_t l;
            if (!own_rx_avail(ctx) || !own_rx_chain(ctx, 0, &head, &off, &l) || l - HDR < len - send) {
                *stuck = 1;
                break;
            }
            memcpy((uint8_t *)ctx->base + off + HDR, buf + HDR + send, len - send);
            ctx->rx_last_avail++;
        }
        memcpy(buf, e->hdr, HDR);
        memcpy(buf + 24, &send, 4);
        own_put(ctx, e->rs_head[i], HDR + send);
        (*packets)++;
        bytes += send;
        if (send < len) {   /* the credit is used up: the chain with the rest is held in its place */
            e->rs_head[i] = head; e->rs_off[i] = off; e->rs_len[i] = len - send;
            break;
        }
        e->rs_first++;
    }
    if (e->rs_first == e->rs_n) e->rs_first = e->rs_n = 0;
    return bytes;
}

/* e's CREDIT_UPDATE header: its RW header with len 0, op 6 and our fwd_cnt */
static void own_update_hdr(const vq_own *e, uint8_t *h) {
    uint32_t zero = 0; uint16_t op = 6;
    memcpy(h, e->hdr, HDR);
    memcpy(h + 24, &zero, 4); memcpy(h + 30, &op, 2); memcpy(h + 40, &e->fwd_cnt, 4);
}

/* C gives the connection back with chains held: their bytes are copied out for Python (the
   peer's prebuf: they go to the guest before the socket's), and each chain goes to the guest
   as a CREDIT_UPDATE, which tells it only what it knows. */
static void own_unreserve(vq_tx_ctx *ctx, vq_own *e) {
    if (e->rs_first >= e->rs_n) return;
    uint8_t h[HDR];
    own_update_hdr(e, h);
    for (uint32_t i = e->rs_first; i < e->rs_n; i++) {
        uint8_t *buf = (uint8_t *)ctx->base + e->rs_off[i];
        memcpy(e->ra + e->ra_len, buf + HDR, e->rs_len[i]);   /* at most RA_MAX in all */
        e->ra_len += e->rs_len[i];
        memcpy(buf, h, HDR);
        own_put(ctx, e->rs_head[i], HDR);
        e->updates_sent++;
    }
    e->rs_first = e->rs_n = 0;
    e->adv_fwd_cnt = e->fwd_cnt;
    own_publish(ctx);
}

/* Python takes the connection back: what C holds for it goes first (ring shadows loaded). */
void vq_own_take(vq_tx_ctx *ctx, uint32_t slot) {
    ctx->released = ctx->rx_chains = ctx->rx_notifications = ctx->waits = 0;
    if (slot < ctx->nown && ctx->own[slot].active) own_unreserve(ctx, &ctx->own[slot]);
}

/* Host data for an owned connection into the rx ring, the chains it holds first, as far as
   its credit, the burst and the socket go, published at once. C keeps the connection while
   only its guest window (for a guest that updates unasked; C reads ahead for it meanwhile) or
   its host socket (OWN_F_WAIT: Python watches the fd and calls vq_own_fill when it is
   readable) holds it up; anything else gives it back. */
static void own_fill(vq_tx_ctx *ctx, vq_own *e) {
    uint32_t in_flight = e->tx_cnt - e->peer_fwd_cnt;
    if (in_flight >= e->peer_buf_alloc) { e->flags &= ~OWN_F_WAIT; return; }  /* shut: wait for the guest */
    uint32_t credit = e->peer_buf_alloc - in_flight;
    if (credit > ctx->rx_burst) credit = ctx->rx_burst;
    memcpy(e->hdr + 40, &e->fwd_cnt, 4);  /* the guest sees our fwd_cnt in every packet */
    uint32_t packets = 0, bytes = 0, status = RX_SHORT;
    int stuck = 0;
    if (e->rs_n) {
        bytes = own_deliver(ctx, e, credit, &packets, &stuck);
        if (stuck) status = RX_SLOW;
        else if (e->rs_n) status = RX_LIMIT;   /* credit or burst used up with chains still held */
    }
    vq_rx_result res;
    res.err = 0;
    if (status == RX_SHORT) {
        uint32_t n = own_rx_avail(ctx);
        if (n == 0) {
            status = RX_SLOW;  /* Python decides */
        } else {
            static vq_cap nocap;  /* owned connections are never captured */
            vq_rx_fill(ctx->base, ctx->region_gpa, ctx->region_size, ctx->rx_desc, ctx->rx_avail, ctx->rx_num,
                       ctx->rx_last_avail, n, ctx->rx_used, ctx->rx_used_idx, e->fd, credit - bytes,
                       ctx->rx_max_packets - packets, e->hdr, &res, &nocap);
            ctx->rx_last_avail += res.packets;
            ctx->rx_used_idx += res.packets;
            ctx->rx_chains += res.packets;
            packets += res.packets; bytes += res.bytes; status = res.status;
        }
    }
    if (packets) {
        e->tx_cnt += bytes;
        e->packets += packets;
        e->bytes += bytes;
        e->adv_fwd_cnt = e->fwd_cnt;
        own_publish(ctx);
    }
    switch (status) {
    case RX_LIMIT:
        /* The window is shut again: C keeps a connection whose guest updates unasked, and reads
           ahead for it; one that must be asked goes back, for Python asks (VsockCore.fill_rx).
           Credit left after a burst goes back too: Python serves connections in turn. */
        if (!own_shut(e) || !(e->flags & OWN_F_SELF)) {
            own_release(ctx, e, OWN_LIMIT);
        } else {
            e->flags &= ~OWN_F_WAIT;
            own_reserve(ctx, e);
        }
        break;
    case RX_SLOW: own_release(ctx, e, OWN_SLOW); break;
    case RX_EOF: own_release(ctx, e, OWN_EOF); break;
    case RX_ERROR: e->err = res.err; own_release(ctx, e, OWN_ERROR); break;
    default:
        /* RX_AGAIN, RX_SHORT: the socket ran dry with credit left. C keeps the connection and
           Python watches the socket for it. */
        if (!(e->flags & OWN_F_WAIT)) { e->flags |= OWN_F_WAIT; ctx->waits++; }
        break;
    }
}

/* A CREDIT_UPDATE for an owned connection, with the effect VsockCore.guest_credit has: the
   guest's credit taken, and if its window opened, host data read into the rx ring at once. */
static void own_credit(vq_tx_ctx *ctx, vq_own *e, uint32_t buf_alloc, uint32_t fwd_cnt) {
    e->updates++;
    e->credit_items++;
    e->peer_buf_alloc = buf_alloc;
    e->peer_fwd_cnt = fwd_cnt;
    if (!(e->flags & OWN_F_REQUESTED)) e->flags |= OWN_F_SELF;
    if (own_shut(e)) return;  /* still shut */
    e->flags &= ~OWN_F_REQUESTED;
    own_fill(ctx, e);
}

/* Credit.update_due: the guest counts more than a quarter of the usable window (the smaller
   of the two buf_allocs: a Linux sender caps its credit at its own) as outstanding, and we
   have news for it. */
static int own_update_due(const vq_own *e) {
    if (e->fwd_cnt == e->adv_fwd_cnt) return 0;
    uint32_t window = e->peer_buf_alloc && e->peer_buf_alloc < e->buf_alloc ? e->peer_buf_alloc : e->buf_alloc;
    return (uint32_t)(e->rx_cnt - e->adv_fwd_cnt) > window / 4;
}

/* A CREDIT_UPDATE for e into the next rx chain (the Linux shape), published at once.
   0 if there is no such chain: Python then queues it (VsockCore._credit_changed). */
static int own_put_update(vq_tx_ctx *ctx, vq_own *e) {
    uint32_t n = own_rx_avail(ctx);
    if (n == 0) return 0;
    uint8_t h[HDR];
    own_update_hdr(e, h);
    static vq_cap nocap;
    if (!vq_rx_put((uint8_t *)ctx->base, ctx->region_gpa, ctx->region_size, ctx->rx_desc, ctx->rx_avail,
                   ctx->rx_num, ctx->rx_last_avail, n, ctx->rx_used, ctx->rx_used_idx, h, &nocap))
        return 0;
    ctx->rx_last_avail++;
    ctx->rx_used_idx++;
    ctx->rx_chains++;
    e->adv_fwd_cnt = e->fwd_cnt;
    e->updates_sent++;
    own_publish(ctx);
    return 1;
}

/* The run's payload to the host socket, without waiting. Returns the bytes the socket took;
   *err is set (an errno) only for a failure other than a full socket. */
#define SEND_IOV 64
static uint64_t own_send(vq_tx_ctx *ctx, vq_own *e, const vq_item *run, int *err) {
    struct iovec iov[SEND_IOV];
    uint64_t sent = 0;
    uint32_t k = run->seg_first, end = run->seg_first + run->nseg;
    *err = 0;
    while (k < end) {
        uint32_t m = 0;
        uint64_t want = 0;
        for (; k < end && m < SEND_IOV; k++, m++) {
            iov[m].iov_base = (void *)((ctx->seg_kind[k] ? ctx->scratch : ctx->base) + ctx->seg_off[k]);
            iov[m].iov_len = ctx->seg_len[k];
            want += ctx->seg_len[k];
        }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov; msg.msg_iovlen = m;
        ssize_t n;
        do n = sendmsg(e->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) *err = errno;
            break;
        }
        sent += (uint64_t)n;
        if ((uint64_t)n < want) break;
    }
    return sent;
}

/* A run of RW packets of an owned connection with OWN_F_TX, as VsockCore._guest_rw and
   _flush_conn take it: credit checked, the bytes counted forwarded ahead so the update they
   make due reaches the guest before our copy, then sent. Returns 1 when the run is done with
   (sent, or dropped with the connection on a socket error); 0 when it stays an item for
   Python, which then has the connection back: a run beyond the credit we gave (Python resets
   it), or the tail the socket did not take (ITEM_TAIL, trimmed to the unsent bytes). */
static int own_tx_run(vq_tx_ctx *ctx, vq_own *e, vq_item *run) {
    uint32_t total = run->total;
    if ((uint64_t)(uint32_t)(e->rx_cnt - e->adv_fwd_cnt) + total > e->buf_alloc) {
        own_release(ctx, e, OWN_GUEST);
        return 0;
    }
    e->rx_cnt += total;
    e->tx_packets += run->nchains;
    e->tx_bytes += total;
    e->peer_buf_alloc = run->buf_alloc;
    e->peer_fwd_cnt = run->fwd_cnt;
    e->fwd_cnt += total;
    int stuck = own_update_due(e) && !own_put_update(ctx, e);   /* no rx chain for it: Python's */
    int err;
    uint64_t sent = own_send(ctx, e, run, &err);
    if (err) {
        e->err = err;
        own_release(ctx, e, OWN_ERROR);   /* Python resets the connection: the data goes with it */
        return 1;
    }
    if (sent < total) {
        e->ahead = total - (uint32_t)sent;   /* counted forwarded, still to go (Credit.ahead) */
        uint32_t k = run->seg_first;
        while (sent >= ctx->seg_len[k]) { sent -= ctx->seg_len[k]; k++; run->nseg--; }
        ctx->seg_off[k] += sent; ctx->seg_len[k] -= (uint32_t)sent;
        run->seg_first = k;
        run->total = e->ahead;
        run->kind = ITEM_TAIL;
        own_release(ctx, e, OWN_BLOCKED);
        return 0;
    }
    e->sends++;
    if (stuck) {
        own_release(ctx, e, OWN_SLOW);
        return 1;
    }
    if (!(e->flags & OWN_F_WAIT) && !own_shut(e)) {
        /* its packets opened the guest's window (VsockCore._credit_changed): host data goes */
        e->flags &= ~OWN_F_REQUESTED;
        own_fill(ctx, e);
    }
    return 1;
}

/* The host socket of an owned connection waiting for data (OWN_F_WAIT) became readable.
   Returns 1 if C still waits for the socket, 0 if it keeps the connection but waits for the
   guest's credit (Python stops watching), -1 if it gave the connection back. */
int vq_own_fill(vq_tx_ctx *ctx, uint32_t slot) {
    ctx->released = ctx->rx_chains = ctx->rx_notifications = ctx->waits = 0;
    if (slot >= ctx->nown || !ctx->own[slot].active) return -1;
    vq_own *e = &ctx->own[slot];
    own_fill(ctx, e);
    if (!e->active) return -1;
    return (e->flags & OWN_F_WAIT) ? 1 : 0;
}

/* The guest kicked the tx queue of a device whose connections C runs, nothing captured: C
   reads the kick, takes the chains, and as long as every chain is a credit update it handles
   itself, returns them, publishes, re-enables kicks and looks again, with no turn through
   Python. Returns 0 when the ring is empty and kicks are on again; 1 when the last batch has
   something for Python (items, kick_items of them, or connections given back: its consumed
   heads are Python's to return); 2 when Python's pump must look (an avail index
   jump, or a guest still sending after 16 batches). The tx shadows and counters are stored
   back in every case, and waits counts the connections that began waiting for their socket. */
#include <time.h>
static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
/* 1 if a connection C runs waits for the guest's credit (its window shut) */
static int own_awaits_guest(const vq_tx_ctx *ctx) {
    for (uint32_t k = 0, seen = 0; k < ctx->nown && seen < ctx->owned; k++) {
        const vq_own *e = &ctx->own[k];
        if (!e->active) continue;
        seen++;
        if (!(e->flags & OWN_F_WAIT) && own_shut(e)) return 1;
    }
    return 0;
}

/* 1 if the guest made a new tx entry available within spin_ns */
static int tx_spin(vq_tx_ctx *ctx) {
    uint64_t end = now_ns() + ctx->spin_ns;
    do {
        for (int k = 0; k < 64; k++) {
            if (__atomic_load_n(&ctx->avail[1], __ATOMIC_ACQUIRE) != ctx->tx_last_avail) return 1;
            __builtin_ia32_pause();
        }
    } while (now_ns() < end);
    return 0;
}

int vq_tx_kick(vq_tx_ctx *ctx) {
    uint64_t v;
    ssize_t r = read(ctx->kick_fd, &v, 8);  /* EAGAIN: a kick read already, or a look without one */
    (void)r;
    uint32_t rx_chains = 0, rx_notifications = 0, waits = 0, num = ctx->num, status = 0;
    static vq_cap nocap;
    ctx->tx_chains = ctx->tx_notifications = 0;
    ctx->kick_items = 0;
    for (int armed = 0, rounds = 0, spun = 0;;) {
        if (++rounds > 16) { status = 2; break; }  /* a guest that never stops: the loop's other fds get a turn */
        uint16_t avail_idx = __atomic_load_n(&ctx->avail[1], __ATOMIC_ACQUIRE);
        uint32_t n = (uint16_t)(avail_idx - ctx->tx_last_avail);
        if (n > num) { status = 2; break; }
        if (n == 0) {
            if (armed) break;
            if (ctx->spin_ns && !spun && own_awaits_guest(ctx)) {
                /* The guest's next credit update is usually a window's drain away: watching for
                   it saves the kick (and the wake-up) it would cost. Only for that: a guest
                   sending data is better left to fill the ring for one big batch, and the CPU
                   the watch would take is the guest's. */
                spun = 1;
                if (tx_spin(ctx)) continue;
            }
            /* as SplitQueue.enable_kicks: ask for a kick at the next entry, then look again */
            if (ctx->tx_event_idx) __atomic_store_n(ctx->tx_avail_event_p, ctx->tx_last_avail, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            armed = 1;
            continue;
        }
        armed = 0;
        if (n > ctx->limit) n = ctx->limit;
        int count = vq_tx_batch(ctx, ctx->tx_last_avail, n, &nocap);
        rx_chains += ctx->rx_chains;
        rx_notifications += ctx->rx_notifications;
        ctx->tx_last_avail += ctx->taken;
        waits += ctx->waits;
        if (count != 0 || ctx->released) { ctx->kick_items = count; status = 1; break; }
        for (uint32_t k = 0; k < ctx->nconsumed; k++) {
            uint32_t slot = (uint16_t)(ctx->tx_used_idx + k) & (num - 1);
            ctx->tx_used[2 * slot] = ctx->consumed[k];
            ctx->tx_used[2 * slot + 1] = 0;
        }
        ctx->tx_used_idx += ctx->nconsumed;
        ctx->tx_chains += ctx->nconsumed;
        ctx->nconsumed = 0;
    }
    ctx->tx_notifications += ring_publish(ctx->tx_used_idx_p, ctx->avail, num, ctx->tx_event_idx, ctx->tx_call_fd,
                                          ctx->tx_used_idx, &ctx->tx_signalled);
    ctx->rx_chains = rx_chains;
    ctx->rx_notifications = rx_notifications;
    ctx->waits = waits;
    return (int)status;
}

/* One header-only packet (a control packet) into the next rx chain, if it has the Linux
   shape; 0 (nothing written) otherwise, and Python's walker takes the chain. */
int vq_rx_put(uint8_t *base, uint64_t region_gpa, uint64_t region_size,
              const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail, uint32_t avail_n,
              uint32_t *used_ring, uint16_t used_idx, const uint8_t *hdr, vq_cap *cap)
{
    if (avail_n == 0) return 0;
    uint16_t head = __atomic_load_n(&avail[2 + (last_avail & (num - 1))], __ATOMIC_ACQUIRE);
    if (head >= num) return 0;
    uint64_t a; uint32_t l; uint16_t f, nx;
    rd_desc(desc + 16 * (uint64_t)head, &a, &l, &f, &nx);
    if (f != F_WRITE || l < HDR || !in_region(a, HDR, region_gpa, region_size)) return 0;
    if (cap->mode && cap->used + cap_record_size(cap, 0) > cap->size) return 0;
    memcpy(base + (a - region_gpa), hdr, HDR);
    if (cap->mode) cap_record(cap, hdr, hdr, 0, 0);
    uint32_t slot = used_idx & (num - 1);
    used_ring[2 * slot] = head;
    used_ring[2 * slot + 1] = HDR;
    return 1;
}

#include <poll.h>
#include <unistd.h>

/* The simulated guest's bulk sender, as a guest kernel runs it: keep the tx ring full of RW
   chains (each head already holds the blast's indirect table) within the peer's credit, take
   CREDIT_UPDATEs for the connection off the rx ring, reclaim used tx chains, kick and wait as
   EVENT_IDX asks. Anything else on the rx ring stops it (SG_RX): Python handles it. */
enum { SG_DONE = 0, SG_RX = 1, SG_TIMEOUT = 2, SG_BAD = 3, SG_HEADERS = 4 };

/* The fields of a virtio-vsock header the simulated guest's loops look at. */
typedef struct {
    uint64_t src_cid, dst_cid;
    uint32_t src_port, dst_port, len, buf_alloc, fwd_cnt;
    uint16_t type, op;
} sg_hdr;

static inline void sg_read_hdr(const uint8_t *h, sg_hdr *x) {
    memcpy(&x->src_cid, h, 8); memcpy(&x->dst_cid, h + 8, 8); memcpy(&x->src_port, h + 16, 4);
    memcpy(&x->dst_port, h + 20, 4); memcpy(&x->len, h + 24, 4); memcpy(&x->type, h + 28, 2);
    memcpy(&x->op, h + 30, 2); memcpy(&x->buf_alloc, h + 36, 4); memcpy(&x->fwd_cnt, h + 40, 4);
}

static inline int sg_hdr_ours(const sg_hdr *x, uint64_t guest_cid, uint64_t peer_cid, uint32_t local_port,
                              uint32_t peer_port, uint32_t type) {
    return x->src_cid == peer_cid && x->dst_cid == guest_cid && x->src_port == peer_port
           && x->dst_port == local_port && x->type == type;
}

static inline int sg_need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static inline uint16_t ld16(uint8_t *mem, uint32_t w) {
    return __atomic_load_n((uint16_t *)mem + w, __ATOMIC_ACQUIRE);
}

static inline void st16(uint8_t *mem, uint32_t w, uint16_t v) {
    __atomic_store_n((uint16_t *)mem + w, v, __ATOMIC_RELEASE);
}

/* The next used rx entry, checked as a guest driver checks it (a head it posted, room for a
   header): its head, used length and buffer, or 0 for SG_RX (Python's to look at). */
static inline const uint8_t *sg_next_rx(uint8_t *mem, const sg_ring *r, const uint32_t *rx_off, uint32_t *head,
                                        uint32_t *len) {
    const uint32_t *u32 = (const uint32_t *)mem;
    uint32_t slot = r->used_ring_d + 2 * (r->last_used & r->mask);
    uint32_t h = u32[slot], l = u32[slot + 1];
    if (h > r->mask || !r->inflight[h] || l < HDR) return 0;
    *head = h;
    *len = l;
    return mem + rx_off[h];
}

/* The rx buffer of a used entry taken goes straight back, as Linux refills its rx ring. */
static inline void sg_repost(uint8_t *mem, sg_ring *r, uint32_t head) {
    ((uint16_t *)mem)[r->avail_ring_w + (r->avail_idx & r->mask)] = (uint16_t)head;
    r->avail_idx++;
    r->last_used++;
}

static void sg_kick(uint8_t *mem, sg_ring *r, int event_idx, uint64_t *kicks) {
    uint16_t new_idx = r->avail_idx, old = r->kicked_idx;
    if (new_idx == old) return;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* avail->idx before reading avail_event */
    r->kicked_idx = new_idx;
    int want = event_idx ? sg_need_event(ld16(mem, r->avail_event_w), new_idx, old)
                         : !(ld16(mem, r->used_idx_w - 1) & 1);  /* used->flags NO_NOTIFY */
    if (want) {
        uint64_t one = 1;
        if (write(r->kick_fd, &one, 8) == 8) (*kicks)++;
    }
}

/* Wait for an interrupt on any of the call eventfds; 1 on timeout. */
static int sg_wait(const int *fds, uint32_t n, int timeout_ms, uint64_t *interrupts) {
    struct pollfd p[16];
    if (n > 16) n = 16;
    for (uint32_t k = 0; k < n; k++) { p[k].fd = fds[k]; p[k].events = POLLIN; p[k].revents = 0; }
    int got = poll(p, n, timeout_ms);
    if (got == 0) return 1;
    for (uint32_t k = 0; k < n; k++) {
        if (p[k].revents & POLLIN) {
            uint64_t v;
            if (read(p[k].fd, &v, 8) == 8) (*interrupts)++;
        }
    }
    return 0;
}

static int sg_reclaim_tx(uint8_t *mem, sg_blast_state *s) {
    sg_ring *r = &s->tx;
    uint16_t used = ld16(mem, r->used_idx_w);
    uint32_t *u32 = (uint32_t *)mem;
    while (r->last_used != used) {
        uint32_t head = u32[r->used_ring_d + 2 * (r->last_used & r->mask)];
        if (head > r->mask || !r->inflight[head]) return -1;
        r->inflight[head] = 0;
        s->free_heads[s->nfree++] = (uint16_t)head;
        r->last_used++;
        s->tx_done++;
    }
    if (s->event_idx) st16(mem, r->used_event_w, r->last_used);
    return 0;
}

/* Credit updates for the connection; 1 when the next used entry is something else. */
static int sg_take_rx(uint8_t *mem, sg_blast_state *s) {
    sg_ring *r = &s->rx;
    uint16_t used = ld16(mem, r->used_idx_w);
    int stop = 0;
    uint16_t before = r->avail_idx;
    while (r->last_used != used) {
        if (s->nheaders == s->max_headers) { stop = SG_HEADERS; break; }
        uint32_t head, len;
        const uint8_t *h = sg_next_rx(mem, r, s->rx_off, &head, &len);
        if (!h) { stop = SG_RX; break; }
        sg_hdr x;
        sg_read_hdr(h, &x);
        if (x.op != 6 || x.len != 0
            || !sg_hdr_ours(&x, s->guest_cid, s->peer_cid, s->local_port, s->peer_port, s->type)) {
            stop = SG_RX; break;
        }
        memcpy(s->headers + 44 * s->nheaders++, h, 44);
        s->peer_buf_alloc = x.buf_alloc;
        s->peer_fwd_cnt = x.fwd_cnt;
        /* the buffer goes straight back, as Linux refills its rx ring */
        sg_repost(mem, r, head);
    }
    if (r->avail_idx != before) st16(mem, r->avail_idx_w, r->avail_idx);
    if (s->event_idx) st16(mem, r->used_event_w, r->last_used);
    return stop;
}

static inline uint32_t sg_credit(const sg_blast_state *s) {
    uint32_t window = s->peer_buf_alloc < s->buf_alloc ? s->peer_buf_alloc : s->buf_alloc;
    uint32_t in_flight = s->tx_cnt - s->peer_fwd_cnt;
    return in_flight >= window ? 0 : window - in_flight;
}

int sg_blast(uint8_t *mem, sg_blast_state *s) {
    uint16_t *u16 = (uint16_t *)mem;
    for (;;) {
        if (sg_reclaim_tx(mem, s) < 0) return SG_BAD;
        int stop = sg_take_rx(mem, s);
        sg_kick(mem, &s->rx, s->event_idx, &s->kicks);
        if (stop) return stop;
        if (s->sent == s->to_send) return SG_DONE;
        uint64_t n = s->to_send - s->sent;
        uint32_t by_credit = sg_credit(s) / s->plen;
        if (n > by_credit) n = by_credit;
        if (n > s->nfree) n = s->nfree;
        if (n) {
            sg_ring *r = &s->tx;
            for (uint64_t k = 0; k < n; k++) {
                uint16_t head = s->free_heads[--s->nfree];
                r->inflight[head] = 1;
                u16[r->avail_ring_w + (r->avail_idx & r->mask)] = head;
                r->avail_idx++;
            }
            st16(mem, r->avail_idx_w, r->avail_idx);
            s->tx_cnt += (uint32_t)n * s->plen;
            s->sent += n;
            sg_kick(mem, r, s->event_idx, &s->kicks);
            continue;
        }
        /* Nothing to send: wait for an interrupt, having re-armed both rings above; entries
           used since are seen by the checks at the top of the loop first. */
        if (ld16(mem, s->tx.used_idx_w) != s->tx.last_used || ld16(mem, s->rx.used_idx_w) != s->rx.last_used)
            continue;
        if (sg_wait(s->wait_fds, s->nwait, s->timeout_ms, &s->interrupts)) return SG_TIMEOUT;
    }
}

/* The simulated guest's bulk receiver, as a guest kernel with a reader that consumes at once:
   RW packets of the connection off the rx ring (credit checked, fwd_cnt advanced, the buffer
   posted again), until `want` bytes; SG_CREDIT when Linux 6.1 would send a CREDIT_UPDATE
   (free space below 64 KiB), sent from C in a prepared tx chain, or by Python once those ran
   out; a CREDIT_REQUEST for the connection is answered the same way; anything else is
   Python's (SG_RX). */
enum { SG_CREDIT = 5 };

/* A header-only CREDIT_UPDATE in the next prepared tx chain, posted and kicked as Linux sends
   it (one direct descriptor); 0 when no prepared chain is left. */
static int sg_send_credit(uint8_t *mem, sg_drain_state *s) {
    if (s->ctl_used == s->nctl) return 0;
    uint16_t head = s->ctl_heads[s->ctl_used];
    uint8_t *h = mem + s->ctl_off[s->ctl_used];
    s->ctl_used++;
    uint32_t zero = 0;
    uint16_t type = (uint16_t)s->type, op = 6;
    memcpy(h, &s->guest_cid, 8); memcpy(h + 8, &s->peer_cid, 8);
    memcpy(h + 16, &s->local_port, 4); memcpy(h + 20, &s->peer_port, 4);
    memcpy(h + 24, &zero, 4); memcpy(h + 28, &type, 2); memcpy(h + 30, &op, 2);
    memcpy(h + 32, &zero, 4); memcpy(h + 36, &s->buf_alloc, 4); memcpy(h + 40, &s->fwd_cnt, 4);
    s->last_fwd_cnt = s->fwd_cnt;
    sg_ring *t = &s->tx;
    t->inflight[head] = 1;
    ((uint16_t *)mem)[t->avail_ring_w + (t->avail_idx & t->mask)] = head;
    t->avail_idx++;
    st16(mem, t->avail_idx_w, t->avail_idx);
    sg_kick(mem, t, s->event_idx, &s->kicks);
    return 1;
}

int sg_drain(uint8_t *mem, sg_drain_state *s) {
    sg_ring *r = &s->rx;
    for (;;) {
        uint16_t used = ld16(mem, r->used_idx_w);
        uint16_t before = r->avail_idx;
        int stop = 0;
        while (r->last_used != used && s->got < s->want) {
            if (s->nheaders == s->max_headers) { stop = SG_HEADERS; break; }
            uint32_t head, len;
            const uint8_t *h = sg_next_rx(mem, r, s->rx_off, &head, &len);
            if (!h) { stop = SG_RX; break; }
            sg_hdr x;
            sg_read_hdr(h, &x);
            uint32_t plen = x.len;
            if (x.op == 7 && x.len == 0
                && sg_hdr_ours(&x, s->guest_cid, s->peer_cid, s->local_port, s->peer_port, s->type)) {
                /* CREDIT_REQUEST: answered at once with what the reader has taken (Linux 6.1
                   virtio_transport_recv_connected), the buffer reposted first */
                if (s->ctl_used == s->nctl) { stop = SG_RX; break; }
                memcpy(s->headers + 44 * s->nheaders++, h, 44);
                sg_repost(mem, r, head);
                st16(mem, r->avail_idx_w, r->avail_idx);
                sg_send_credit(mem, s);
                continue;
            }
            if (x.op != 5 || x.type != 1 || plen > len - HDR || plen > s->rx_payload
                || !sg_hdr_ours(&x, s->guest_cid, s->peer_cid, s->local_port, s->peer_port, s->type)
                || (uint32_t)(s->rx_cnt + plen - s->last_fwd_cnt) > s->buf_alloc) {
                stop = SG_RX; break;
            }
            memcpy(s->headers + 44 * s->nheaders++, h, 44);
            s->rx_cnt += plen;
            s->fwd_cnt += plen;  /* the reader takes it at once */
            s->got += plen;
            s->packets++;
            sg_repost(mem, r, head);
            if (s->buf_alloc - (s->fwd_cnt - s->last_fwd_cnt) < 65536) {
                st16(mem, r->avail_idx_w, r->avail_idx);  /* the buffers back before the credit */
                if (!sg_send_credit(mem, s)) { stop = SG_CREDIT; break; }
            }
        }
        if (r->avail_idx != before) st16(mem, r->avail_idx_w, r->avail_idx);
        if (s->event_idx) st16(mem, r->used_event_w, r->last_used);
        sg_kick(mem, r, s->event_idx, &s->kicks);
        if (stop) return stop;
        if (s->got >= s->want) return SG_DONE;
        if (ld16(mem, r->used_idx_w) != r->last_used) continue;
        if (sg_wait(s->wait_fds, s->nwait, s->timeout_ms, &s->interrupts)) return SG_TIMEOUT;
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vsproxy._fastpath", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
