/* The simulated guest's request/response loop, as a guest kernel and a program blocked in
   recv() run it: a request posted in a tx chain and kicked as EVENT_IDX asks, then a sleep on
   the interrupt until the answer's RW packets come back on the rx ring (credit checked,
   fwd_cnt advanced, the buffer posted again). Used tx chains are reclaimed when a send needs
   one, without asking for a tx interrupt unless every lent chain is in flight: a guest waiting
   for an answer is woken by the answer, not by its request's completion. The connection's
   CREDIT_UPDATEs are taken on the way; anything else is Python's (SG_RX), and so is a credit
   update the guest owes (SG_CREDIT). */
#include <time.h>

#include "sg.h"

static uint64_t sg_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Used tx entries back to the lent chains; -1 for a head C did not post. */
static int rtt_reclaim_tx(uint8_t *mem, sg_rtt_state *s) {
    sg_ring *r = &s->tx;
    uint16_t used = ld16(mem, r->used_idx_w);
    const uint32_t *u32 = (const uint32_t *)mem;
    while (r->last_used != used) {
        uint32_t head = u32[r->used_ring_d + 2 * (r->last_used & r->mask)];
        uint32_t k = 0;
        while (k < s->ntx && (s->tx_heads[k] != head || !s->tx_busy[k])) k++;
        if (k == s->ntx || head > r->mask || !r->inflight[head]) return -1;
        r->inflight[head] = 0;
        s->tx_busy[k] = 0;
        r->last_used++;
    }
    return 0;
}

/* A free lent chain, or -1 (all in flight) */
static int rtt_free_chain(const sg_rtt_state *s) {
    for (uint32_t k = 0; k < s->ntx; k++)
        if (!s->tx_busy[k]) return (int)k;
    return -1;
}

static inline uint32_t rtt_credit(const sg_rtt_state *s) {
    uint32_t window = s->peer_buf_alloc < s->buf_alloc ? s->peer_buf_alloc : s->buf_alloc;
    uint32_t in_flight = s->tx_cnt - s->peer_fwd_cnt;
    return in_flight >= window ? 0 : window - in_flight;
}

/* The request (or the echo, or a REQUEST) in lent chain k, posted and kicked. */
static void rtt_send(uint8_t *mem, sg_rtt_state *s, int k, uint16_t op, uint32_t len) {
    uint8_t *h = mem + s->tx_off[k];
    uint32_t zero = 0;
    uint16_t type = (uint16_t)s->type;
    memcpy(h, &s->guest_cid, 8); memcpy(h + 8, &s->peer_cid, 8);
    memcpy(h + 16, &s->local_port, 4); memcpy(h + 20, &s->peer_port, 4);
    memcpy(h + 24, &len, 4); memcpy(h + 28, &type, 2); memcpy(h + 30, &op, 2);
    memcpy(h + 32, &zero, 4); memcpy(h + 36, &s->buf_alloc, 4); memcpy(h + 40, &s->fwd_cnt, 4);
    if (len) memset(h + 64, (int)(s->done & 0xff), len);
    s->last_fwd_cnt = s->fwd_cnt;   /* the header told the peer */
    s->tx_cnt += len;
    sg_ring *t = &s->tx;
    uint16_t head = s->tx_heads[k];
    s->tx_busy[k] = 1;
    t->inflight[head] = 1;
    ((uint16_t *)mem)[t->avail_ring_w + (t->avail_idx & t->mask)] = head;
    t->avail_idx++;
    st16(mem, t->avail_idx_w, t->avail_idx);
    s->posted++;
    sg_kick(mem, t, s->event_idx, &s->kicks);
}

/* The rx ring's new entries for the connection; returns a stop code, or 0 to go on. */
static int rtt_take_rx(uint8_t *mem, sg_rtt_state *s) {
    sg_ring *r = &s->rx;
    uint16_t used = ld16(mem, r->used_idx_w);
    uint16_t before = r->avail_idx;
    int stop = 0;
    while (r->last_used != used) {
        if (s->nheaders == s->max_headers) { stop = SG_HEADERS; break; }
        uint32_t head, len;
        const uint8_t *h = sg_next_rx(mem, r, s->rx_off, &head, &len);
        if (!h) { stop = SG_RX; break; }
        sg_hdr x;
        sg_read_hdr(h, &x);
        if (!sg_hdr_ours(&x, s->guest_cid, s->peer_cid, s->local_port, s->peer_port, s->type)) { stop = SG_RX; break; }
        if (s->mode == RTT_CONNECT) {
            if (s->phase != 1 || (x.op != VIRTIO_VSOCK_OP_RESPONSE && x.op != VIRTIO_VSOCK_OP_RST)) {
                stop = SG_RX; break;
            }
            s->last_op = x.op;
            s->peer_buf_alloc = x.buf_alloc; s->peer_fwd_cnt = x.fwd_cnt;
            memcpy(s->headers + HDR * s->nheaders++, h, HDR);
            sg_repost(mem, r, head);
            s->phase = 2;   /* answered: what follows (a SHUTDOWN) is Python's, for an open connection */
            break;
        }
        if (x.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE && x.len == 0) {
            s->peer_buf_alloc = x.buf_alloc; s->peer_fwd_cnt = x.fwd_cnt;
            memcpy(s->headers + HDR * s->nheaders++, h, HDR);
            sg_repost(mem, r, head);
            continue;
        }
        if (x.op != VIRTIO_VSOCK_OP_RW || x.type != VIRTIO_VSOCK_TYPE_STREAM || x.len == 0 || x.len > len - HDR
            || x.len > s->rx_payload || (uint32_t)(s->rx_cnt + x.len - s->last_fwd_cnt) > s->buf_alloc) {
            stop = SG_RX; break;
        }
        memcpy(s->headers + HDR * s->nheaders++, h, HDR);
        s->peer_buf_alloc = x.buf_alloc; s->peer_fwd_cnt = x.fwd_cnt;
        s->rx_cnt += x.len;
        s->fwd_cnt += x.len;   /* the program takes it at once */
        s->got += x.len;
        sg_repost(mem, r, head);
    }
    if (r->avail_idx != before) st16(mem, r->avail_idx_w, r->avail_idx);
    if (s->event_idx) st16(mem, r->used_event_w, r->last_used);
    sg_kick(mem, r, s->event_idx, &s->kicks);
    if (!stop && s->buf_alloc - (s->fwd_cnt - s->last_fwd_cnt) < 65536) stop = SG_CREDIT;
    return stop;
}

/* Phases: 0 to send, 1 waiting for the answer (PING, CONNECT) or the request (ECHO). */
int sg_rtt(uint8_t *mem, sg_rtt_state *s) {
    uint32_t op_len = s->mode == RTT_CONNECT ? 0 : s->size;
    uint16_t op = s->mode == RTT_CONNECT ? VIRTIO_VSOCK_OP_REQUEST : VIRTIO_VSOCK_OP_RW;
    if (s->mode == RTT_ECHO && s->phase == 0) s->phase = 1;   /* an echo waits first */
    for (;;) {
        int stop = rtt_take_rx(mem, s);
        if (s->phase == 1 && (s->mode == RTT_CONNECT ? 0 : s->got >= s->size)) {
            s->got -= s->size;
            if (s->mode == RTT_PING) {
                s->times[s->done] = sg_now_ns() - s->t0;
                s->done++;
                s->phase = 0;
            } else {
                s->phase = 0;   /* ECHO: the request is in, answer it */
            }
        }
        if (s->phase == 2) {   /* CONNECT answered */
            s->times[s->done++] = sg_now_ns() - s->t0;
            return SG_DONE;
        }
        /* The answer taken before a packet C leaves to Python (the peer's SHUTDOWN right after
           the last answer) counted above: a loop whose rounds are all done is done. */
        if (stop) return s->phase == 0 && s->done == s->rounds ? SG_DONE : stop;
        if (s->phase == 0) {
            if (s->done == s->rounds) return SG_DONE;
            int k = rtt_free_chain(s);
            if (k < 0) {
                if (rtt_reclaim_tx(mem, s) < 0) return SG_BAD;
                k = rtt_free_chain(s);
            }
            if (k >= 0 && rtt_credit(s) >= op_len) {
                if (s->mode != RTT_ECHO) s->t0 = sg_now_ns();
                rtt_send(mem, s, k, op, op_len);
                if (s->mode == RTT_ECHO) s->done++;
                if (s->mode == RTT_ECHO && s->done == s->rounds) return SG_DONE;
                s->phase = 1;
                continue;
            }
            /* no chain or no credit: the tx completion (asked for now) or a credit update wakes us */
            if (k < 0 && s->event_idx) {
                st16(mem, s->tx.used_event_w, s->tx.last_used);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* used_event before reading used->idx */
            }
            if (k < 0 && rtt_reclaim_tx(mem, s) < 0) return SG_BAD;
            if (k < 0 && rtt_free_chain(s) >= 0) continue;
        }
        if (ld16(mem, s->rx.used_idx_w) != s->rx.last_used) continue;
        if (sg_wait(s->wait_fds, s->nwait, s->timeout_ms, &s->interrupts)) return SG_TIMEOUT;
    }
}
