/* The simulated guest's sender of recorded payload (guest replay): packets whose bytes lie in a
   file (a capture), each read with pread() straight into the payload buffer of a tx chain Python
   lends, its header written with the packet's length and flags (SEQPACKET EOM/EOR), posted and
   kicked as EVENT_IDX asks, within the peer's credit, in the order given: each as one packet
   when the credit allows (as recorded), else cut to what it allows, as Linux sends (the flags
   on the last part). The
   connection's CREDIT_UPDATEs are taken off the rx ring on the way; anything else there is
   Python's (SG_RX). Used tx entries come back to the lent chains; one C did not post is SG_BAD. */
#include <errno.h>
#include <unistd.h>

#include "sg.h"

static int snd_reclaim_tx(uint8_t *mem, sg_send_state *s) {
    sg_ring *r = &s->tx;
    uint16_t used = ld16(mem, r->used_idx_w);
    const uint32_t *u32 = (const uint32_t *)mem;
    while (r->last_used != used) {
        uint32_t head = u32[r->used_ring_d + 2 * (r->last_used & r->mask)];
        if (head > r->mask || !r->inflight[head]) return -1;
        uint32_t k = s->slot_of[head];
        if (k >= s->ntx || s->tx_heads[k] != head || !s->tx_busy[k]) return -1;
        r->inflight[head] = 0;
        s->tx_busy[k] = 0;
        s->free_k[s->nfree++] = k;
        r->last_used++;
        s->tx_done++;
    }
    return 0;
}

/* Credit updates for the connection; a stop code when the next used entry is something else. */
static int snd_take_rx(uint8_t *mem, sg_send_state *s) {
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
        if (x.op != VIRTIO_VSOCK_OP_CREDIT_UPDATE || x.len != 0
            || !sg_hdr_ours(&x, s->guest_cid, s->peer_cid, s->local_port, s->peer_port, s->type)) {
            stop = SG_RX; break;
        }
        memcpy(s->headers + HDR * s->nheaders++, h, HDR);
        s->peer_buf_alloc = x.buf_alloc;
        s->peer_fwd_cnt = x.fwd_cnt;
        sg_repost(mem, r, head);
    }
    if (r->avail_idx != before) st16(mem, r->avail_idx_w, r->avail_idx);
    if (s->event_idx) st16(mem, r->used_event_w, r->last_used);
    sg_kick(mem, r, s->event_idx, &s->kicks);
    return stop;
}

static inline uint32_t snd_credit(const sg_send_state *s) {
    uint32_t window = s->peer_buf_alloc < s->buf_alloc ? s->peer_buf_alloc : s->buf_alloc;
    uint32_t in_flight = s->tx_cnt - s->peer_fwd_cnt;
    return in_flight >= window ? 0 : window - in_flight;
}

/* `len` bytes of packet `i` from `s->part` on, into lent chain k: read from the file, its
   header, its payload descriptor's length; posted. 0, or SG_READ (err: the errno, or 0 for a
   short read). */
static int snd_post(uint8_t *mem, sg_send_state *s, uint32_t k, uint64_t i, uint32_t len) {
    uint8_t *h = mem + s->tx_off[k];
    uint32_t got = 0;
    while (got < len) {
        ssize_t n = pread(s->fd, h + 64 + got, len - got, (off_t)(s->offs[i] + s->part + got));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { s->err = n < 0 ? errno : 0; return SG_READ; }
        got += (uint32_t)n;
    }
    uint16_t type = (uint16_t)s->type, op = VIRTIO_VSOCK_OP_RW;
    uint32_t flags = s->part + len == s->lens[i] ? s->flags[i] : 0;   /* EOM, EOR: on the last part */
    memcpy(h, &s->guest_cid, 8); memcpy(h + 8, &s->peer_cid, 8);
    memcpy(h + 16, &s->local_port, 4); memcpy(h + 20, &s->peer_port, 4);
    memcpy(h + 24, &len, 4); memcpy(h + 28, &type, 2); memcpy(h + 30, &op, 2);
    memcpy(h + 32, &flags, 4); memcpy(h + 36, &s->buf_alloc, 4); memcpy(h + 40, &s->fwd_cnt, 4);
    memcpy(mem + s->len_off[k], &len, 4);   /* the payload descriptor: this packet's length */
    s->tx_cnt += len;
    s->bytes += len;
    sg_ring *t = &s->tx;
    uint16_t head = s->tx_heads[k];
    s->tx_busy[k] = 1;
    t->inflight[head] = 1;
    ((uint16_t *)mem)[t->avail_ring_w + (t->avail_idx & t->mask)] = head;
    t->avail_idx++;
    st16(mem, t->avail_idx_w, t->avail_idx);
    return 0;
}

/* How much of the next packet to send now: all of it when the credit holds it; else a part
   (what the credit allows) only when waiting would not help: the window can never hold the
   packet, or every chain has come back and a short wait brought no credit update (a peer
   need not send one while its own buffer has room). 0: wait. */
static uint32_t snd_now(const sg_send_state *s, int waited) {
    uint32_t len = s->lens[s->sent] - s->part, credit = snd_credit(s);
    if (credit >= len) return len;
    uint32_t window = s->peer_buf_alloc < s->buf_alloc ? s->peer_buf_alloc : s->buf_alloc;
    if (window < len || (waited && s->nfree == s->ntx)) return credit;
    return 0;
}

int sg_send(uint8_t *mem, sg_send_state *s) {
    int waited = 0;   /* a short wait with every chain back brought nothing */
    for (;;) {
        if (snd_reclaim_tx(mem, s) < 0) return SG_BAD;
        int stop = snd_take_rx(mem, s);
        if (stop) return stop;
        if (s->sent == s->npkts) return SG_DONE;
        int posted = 0;
        uint32_t len;
        while (s->sent < s->npkts && s->nfree && (len = snd_now(s, waited)) > 0) {
            int rc = snd_post(mem, s, s->free_k[--s->nfree], s->sent, len);
            if (rc) { s->nfree++; return rc; }
            s->part += len;
            if (s->part == s->lens[s->sent]) { s->sent++; s->part = 0; }
            posted++;
            waited = 0;
            /* kick as we go: vsproxy starts on the first packets while the next are read */
            sg_kick(mem, &s->tx, s->event_idx, &s->kicks);
        }
        if (posted) continue;
        /* No chain or no credit: ask for the tx completion, then sleep until an interrupt;
           entries used meanwhile are seen first. */
        if (s->event_idx) {
            st16(mem, s->tx.used_event_w, s->tx.last_used);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* used_event before reading used->idx */
        }
        if (ld16(mem, s->tx.used_idx_w) != s->tx.last_used || ld16(mem, s->rx.used_idx_w) != s->rx.last_used)
            continue;
        if (s->nfree == s->ntx && snd_credit(s) > 0) {   /* all back, some credit: wait a little, then cut */
            int ms = s->timeout_ms < 10 ? s->timeout_ms : 10;
            if (sg_wait(s->wait_fds, s->nwait, ms, &s->interrupts)) waited = 1;
            continue;
        }
        if (sg_wait(s->wait_fds, s->nwait, s->timeout_ms, &s->interrupts)) return SG_TIMEOUT;
    }
}
