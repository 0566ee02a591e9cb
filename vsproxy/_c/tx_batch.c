/* The tx ring read in batches: Linux-shaped RW packets grouped in runs (one per connection
   and batch, small payloads copied together into scratch; a SEQPACKET run keeps each packet a
   segment of its own, with its flags, for its message boundaries), header-only CREDIT_UPDATE and
   CREDIT_REQUEST packets as items of their own, everything else "slow" for the Python walker;
   credit updates and data of connections lent to C (own.c) taken on the way. */
#include "capture.h"
#include "own.h"

#define COPY_MAX 1024   /* payloads up to this size are copied into scratch, merged per run */


/* Returns the number of items; heads[0..ctx->taken) are the chains taken. */
int vq_tx_batch(vq_tx_ctx *ctx, uint16_t last_avail, uint32_t n, vq_cap *cap)
{
    vq_mem *mem = ctx->mem;
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
    /* Capturing: no room for one more record of plen bytes (a comment's room included) */
#define CAP_FULL(plen) (cap->mode && !cap_room(cap, (plen), CAP_COMMENT_MAX))
    /* Items Python takes (the run C is building for an owned connection is not one) */
#define PY_ITEMS() (nitems - (run && run_e ? 1u : 0u))
    *taken = n;
    ctx->cap = cap;   /* the owned connections' records go where the batch's go, in order */
    ctx->released = ctx->nconsumed = ctx->rx_chains = ctx->rx_notifications = ctx->waits = 0;
    for (uint32_t i = 0; i < n; i++) {
        /* one aligned 16-bit load per avail entry */
        uint16_t head = __atomic_load_n(&avail[2 + ((uint16_t)(last_avail + i) & (num - 1))], __ATOMIC_ACQUIRE);
        heads[i] = head;
        int fast = 0, credit_only = 0;
        uint64_t ha = 0, pa = 0; uint32_t hl = 0, pl = 0;
        const uint8_t *hp = 0, *pp = 0;   /* header and payload, where they are mapped */
        uint32_t pk = 0;                   /* the payload's region */
        if (head < num) {
            uint64_t a; uint32_t l; uint16_t f, nx;
            rd_desc(desc + 16 * (uint64_t)head, &a, &l, &f, &nx);
            if (f == 0 && l == HDR) {
                /* a header alone in one descriptor: how Linux sends control packets */
                ha = a; hl = l; credit_only = 1; fast = 1;
            } else if (f == VRING_DESC_F_INDIRECT && indirect_ok && l == 32 && (hp = gpa_ptr(mem, a, 32))) {
                uint64_t a0, a1; uint32_t l0, l1; uint16_t f0, f1, n0, n1;
                const uint8_t *t = hp;
                rd_desc(t, &a0, &l0, &f0, &n0);
                rd_desc(t + 16, &a1, &l1, &f1, &n1);
                if (f0 == VRING_DESC_F_NEXT && n0 == 1 && f1 == 0) { ha = a0; hl = l0; pa = a1; pl = l1; fast = 1; }
            } else if (f == VRING_DESC_F_NEXT && nx < num && nx != head) {
                uint64_t a1; uint32_t l1; uint16_t f1, n1;
                rd_desc(desc + 16 * (uint64_t)nx, &a1, &l1, &f1, &n1);
                if (f1 == 0) { ha = a; hl = l; pa = a1; pl = l1; fast = 1; }
            }
        }
        uint8_t h[HDR];
        uint32_t plen = 0;
        if (fast) {
            fast = hl == HDR && (hp = gpa_ptr(mem, ha, HDR))
                   && (credit_only || (pl > 0 && (pp = gpa_ptr(mem, pa, pl))));
            pk = mem->last;
        }
        uint16_t type = 0, op = 0;
        uint32_t flags = 0;
        if (fast) {
            memcpy(h, hp, HDR);
            uint64_t src_cid;
            memcpy(&src_cid, h, 8); memcpy(&plen, h + 24, 4); memcpy(&type, h + 28, 2); memcpy(&op, h + 30, 2);
            memcpy(&flags, h + 32, 4);
            if (credit_only)
                fast = src_cid == guest_cid && (type == VIRTIO_VSOCK_TYPE_STREAM || type == VIRTIO_VSOCK_TYPE_SEQPACKET)
                       && (op == VIRTIO_VSOCK_OP_CREDIT_UPDATE || op == VIRTIO_VSOCK_OP_CREDIT_REQUEST) && plen == 0;
            else
                fast = src_cid == guest_cid && (type == VIRTIO_VSOCK_TYPE_STREAM || type == VIRTIO_VSOCK_TYPE_SEQPACKET)
                       && op == VIRTIO_VSOCK_OP_RW && plen > 0 && plen <= pl && plen <= MAX_PKT;
        }
        if (fast && nseg + 1 > max_segs) fast = 0;
        if (fast && CAP_FULL(plen)) {
            /* capture buffer full: end the batch here (the chain stays on the ring) */
            if (i > 0) { *taken = i; break; }
            fast = 0;
        }
        /* Capturing, the records written here land before any record Python writes for the
           batch's slow chains; so that the capture keeps ring order, a batch is either slow
           chains only, or fast chains followed by at most one slow chain. */
        if (fast && cap->mode && seen_slow) { *taken = i; break; }
        if (!fast) {
            /* (records of owned connections given back below must not follow a Python item) */
            if (cap->mode && ctx->owned && PY_ITEMS() > 0) { *taken = i; break; }
            CLOSE_RUN();
            if (nitems == max_items) return -1;
            /* C cannot tell whose it is: every owned connection goes back to Python first */
            if (ctx->owned) own_release_all(ctx);
            vq_item *it = &items[nitems++];
            memset(it, 0, sizeof *it);
            it->kind = ITEM_SLOW; it->chain = i; it->nchains = 1;
            it->cap_off = cap->used; it->cap_rec = cap->records;
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
            /* Capturing, Python may cut the records from one of its items on, and write them
               again through its own path (a capture comment C cannot write): so no record of
               what C does for an owned connection may follow a Python item's. The batch ends
               before such a chain. */
            if (e && cap->mode && PY_ITEMS() > 0) { *taken = i; break; }
            if (e && credit_only && op == VIRTIO_VSOCK_OP_CREDIT_UPDATE && ctx->own_ok) {
                CLOSE_RUN();  /* the run before it may be this connection's, and give it back */
                if (CAP_FULL(0)) { *taken = i; break; }   /* the run's records used the room */
                if (e->active) {
                    if (cap->mode) cap_record(cap, h, h, 0, 1, e->comment, e->comment_len);
                    own_credit(ctx, e, buf_alloc, fwd_cnt);
                    ctx->consumed[ctx->nconsumed++] = head;
                    continue;
                }
            } else if (e && !credit_only && (e->flags & OWN_F_TX) && ctx->own_ok
                       && (type == VIRTIO_VSOCK_TYPE_STREAM || (flags & VIRTIO_VSOCK_SEQ_EOM))) {
                /* its data C sends itself; SEQPACKET, a message whole in one packet (EOM on it):
                   one send of its own. A packet of a longer message is Python's, which
                   assembles the message (SeqPacket._guest_seq_rw) */
                tx_e = e;
            } else if (e) {
                own_release(ctx, e, OWN_GUEST);     /* anything else on it is Python's */
            }
        }
        if (credit_only) {
            CLOSE_RUN();
            if (CAP_FULL(0)) { *taken = i; break; }
            /* an item of its own, between runs: the credit it carries applies in ring order */
            if (nitems == max_items) return -1;
            vq_item *it = &items[nitems++];
            memset(it, 0, sizeof *it);
            it->kind = ITEM_CREDIT; it->chain = i; it->nchains = 1; it->src_port = src_port; it->dst_port = dst_port;
            it->dst_cid = dst_cid; it->buf_alloc = buf_alloc; it->fwd_cnt = fwd_cnt; it->op = op; it->type = type;
            it->cap_off = cap->used; it->cap_rec = cap->records;
            if (cap->mode) cap_record(cap, h, h, 0, 1, 0, 0);
            continue;
        }
        if (!run || run_e != tx_e || run->type != type || run->src_port != src_port || run->dst_port != dst_port
            || run->dst_cid != dst_cid) {
            CLOSE_RUN();
            if (CAP_FULL(plen)) { *taken = i; break; }
            if (nitems == max_items) return -1;
            run = &items[nitems++];
            run_e = tx_e; run_scratch = scratch_used;
            run->kind = ITEM_RUN; run->type = type;
            run->chain = i; run->nchains = 0; run->src_port = src_port; run->dst_port = dst_port;
            run->dst_cid = dst_cid; run->total = 0; run->seg_first = nseg; run->nseg = 0;
            run->cap_off = cap->used; run->cap_rec = cap->records;
            run->marked = tx_e != 0 && tx_e->comment_len != 0;
        }
        run->nchains++;
        run->buf_alloc = buf_alloc; run->fwd_cnt = fwd_cnt;
        run->total += plen;
        const uint8_t *payload = pp;
        if (cap->mode) cap_record(cap, h, payload, plen, 1, tx_e ? tx_e->comment : 0, tx_e ? tx_e->comment_len : 0);
        /* SEQPACKET: each packet stays a segment of its own, with its flags: its bytes are a
           message, or the part of one, the packet's flags say */
        int seq = type == VIRTIO_VSOCK_TYPE_SEQPACKET;
        if (seq) ctx->seg_flags[nseg] = flags;
        if (plen <= COPY_MAX && scratch_used + plen <= scratch_size) {
            /* small payload: copy, and extend the previous scratch segment when adjacent */
            memcpy(scratch + scratch_used, payload, plen);
            if (!seq && run->nseg && seg_kind[nseg - 1] == SEG_SCRATCH
                && seg_off[nseg - 1] + seg_len[nseg - 1] == scratch_used) {
                seg_len[nseg - 1] += plen;
            } else {
                seg_kind[nseg] = SEG_SCRATCH; seg_off[nseg] = scratch_used; seg_len[nseg] = plen; nseg++; run->nseg++;
            }
            scratch_used += plen;
        } else {
            seg_kind[nseg] = (uint8_t)pk; seg_off[nseg] = pa - mem->r[pk].gpa; seg_len[nseg] = plen; nseg++; run->nseg++;
        }
    }
    CLOSE_RUN();
#undef CLOSE_RUN
#undef CAP_FULL
#undef PY_ITEMS
    return (int)nitems;
}
