/* The simulated guest's bulk sender, as a guest kernel runs it: keep the tx ring full of RW
   chains (each head already holds the blast's indirect table) within the peer's credit, take
   CREDIT_UPDATEs for the connection off the rx ring, reclaim used tx chains, kick and wait as
   EVENT_IDX asks. Anything else on the rx ring stops it (SG_RX): Python handles it. */
#include "sg.h"

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
        if (x.op != VIRTIO_VSOCK_OP_CREDIT_UPDATE || x.len != 0
            || !sg_hdr_ours(&x, s->guest_cid, s->peer_cid, s->local_port, s->peer_port, s->type)) {
            stop = SG_RX; break;
        }
        memcpy(s->headers + HDR * s->nheaders++, h, HDR);
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
