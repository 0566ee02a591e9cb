/* The simulated guest's bulk receiver, as a guest kernel with a reader that consumes at once:
   RW packets of the connection off the rx ring (credit checked, fwd_cnt advanced, the buffer
   posted again), until `want` bytes; SG_CREDIT when Linux 6.1 would send a CREDIT_UPDATE
   (free space below 64 KiB), sent from C in a prepared tx chain, or by Python once those ran
   out; a CREDIT_REQUEST for the connection is answered the same way; anything else is
   Python's (SG_RX). */
#include "sg.h"

/* A header-only CREDIT_UPDATE in the next prepared tx chain, posted and kicked as Linux sends
   it (one direct descriptor); 0 when no prepared chain is left. */
static int sg_send_credit(uint8_t *mem, sg_drain_state *s) {
    if (s->ctl_used == s->nctl) return 0;
    uint16_t head = s->ctl_heads[s->ctl_used];
    uint8_t *h = mem + s->ctl_off[s->ctl_used];
    s->ctl_used++;
    uint32_t zero = 0;
    uint16_t type = (uint16_t)s->type, op = VIRTIO_VSOCK_OP_CREDIT_UPDATE;
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
            if (x.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST && x.len == 0
                && sg_hdr_ours(&x, s->guest_cid, s->peer_cid, s->local_port, s->peer_port, s->type)) {
                /* CREDIT_REQUEST: answered at once with what the reader has taken (Linux 6.1
                   virtio_transport_recv_connected), the buffer reposted first */
                if (s->ctl_used == s->nctl) { stop = SG_RX; break; }
                memcpy(s->headers + HDR * s->nheaders++, h, HDR);
                sg_repost(mem, r, head);
                st16(mem, r->avail_idx_w, r->avail_idx);
                sg_send_credit(mem, s);
                continue;
            }
            if (x.op != VIRTIO_VSOCK_OP_RW || x.type != VIRTIO_VSOCK_TYPE_STREAM || plen > len - HDR || plen > s->rx_payload
                || !sg_hdr_ours(&x, s->guest_cid, s->peer_cid, s->local_port, s->peer_port, s->type)
                || (uint32_t)(s->rx_cnt + plen - s->last_fwd_cnt) > s->buf_alloc) {
                stop = SG_RX; break;
            }
            memcpy(s->headers + HDR * s->nheaders++, h, HDR);
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
