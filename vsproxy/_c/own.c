/* The connections lent to C (vq_own, see fastpath.TxFastPath.own): their guest's credit
   updates taken, host data read into the rx ring (read ahead while the guest's window is shut),
   their guest's data sent to the host socket, and the CREDIT_UPDATEs that makes due written to
   the guest; each given back to Python at anything else. Python's state is the truth; this is
   lent. */
#define _GNU_SOURCE   /* sendmmsg */
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "capture.h"
#include "own.h"
#include "ring.h"

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
void vq_own_free_ra(vq_own *e) {
    free(e->ra);
    e->ra = 0;
    e->ra_len = 0;
}

/* The k-th avail chain past C's position, if it has the Linux shape (rx_linux_chain): its head,
   buffer and length; 0 if not. */
static inline int own_rx_chain(const vq_tx_ctx *ctx, uint32_t k, uint16_t *head, uint8_t **buf, uint32_t *len) {
    return rx_linux_chain(ctx->mem, ctx->rx_desc, ctx->rx_avail, ctx->rx_num, (uint16_t)(ctx->rx_last_avail + k),
                          head, buf, len);
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
    /* capturing, at most CAP_HELD_MAX held: the room kept for their records when given back */
    if (ctx->cap->mode && held + n > (uint32_t)CAP_HELD_MAX) n = held < (uint32_t)CAP_HELD_MAX ? CAP_HELD_MAX - held : 0;
    uint32_t cap = e->peer_buf_alloc < RA_MAX ? e->peer_buf_alloc : RA_MAX;
    if (n == 0 || cap == 0) return;
    /* room to copy the bytes out if C must give the connection back before they went */
    if (!e->ra && !(e->ra = malloc(RA_MAX))) return;
    struct iovec iov[RS_MAX];
    uint64_t want = 0;
    uint32_t m = 0;
    while (m < n && want < cap) {
        uint16_t head; uint8_t *buf; uint32_t l;
        if (!own_rx_chain(ctx, m, &head, &buf, &l)) break;
        uint32_t room = l - HDR;
        if (room > MAX_PKT) room = MAX_PKT;
        if (room > cap - want) room = (uint32_t)(cap - want);
        iov[m].iov_base = buf + HDR;
        iov[m].iov_len = room;
        e->rs_head[m] = head; e->rs_buf[m] = buf;
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
   chain, or capturing, no room for the chain's record, *stuck is set (C gives the connection
   back). */
static uint32_t own_deliver(vq_tx_ctx *ctx, vq_own *e, uint32_t credit, uint32_t *packets, int *stuck) {
    uint32_t bytes = 0;
    *stuck = 0;
    vq_cap *cap = ctx->cap;
    while (e->rs_first < e->rs_n && *packets < ctx->rx_max_packets && bytes < credit) {
        uint32_t i = e->rs_first, len = e->rs_len[i], send = len;
        if (cap->mode && !cap_room(cap, len, e->comment_len)) { *stuck = 1; break; }
        uint8_t *buf = e->rs_buf[i], *next = 0;
        uint16_t head = 0;
        if (len > credit - bytes) {
            send = credit - bytes;
            uint32_t l;
            if (!own_rx_avail(ctx) || !own_rx_chain(ctx, 0, &head, &next, &l) || l - HDR < len - send) {
                *stuck = 1;
                break;
            }
            memcpy(next + HDR, buf + HDR + send, len - send);
            ctx->rx_last_avail++;
        }
        memcpy(buf, e->hdr, HDR);
        memcpy(buf + 24, &send, 4);
        if (cap->mode) cap_record(cap, buf, buf + HDR, send, 0, e->comment, e->comment_len);
        own_put(ctx, e->rs_head[i], HDR + send);
        (*packets)++;
        bytes += send;
        if (send < len) {   /* the credit is used up: the chain with the rest is held in its place */
            e->rs_head[i] = head; e->rs_buf[i] = next; e->rs_len[i] = len - send;
            break;
        }
        e->rs_first++;
    }
    if (e->rs_first == e->rs_n) e->rs_first = e->rs_n = 0;
    return bytes;
}

/* e's CREDIT_UPDATE header: its RW header with len 0, op CREDIT_UPDATE and our fwd_cnt */
static void own_update_hdr(const vq_own *e, uint8_t *h) {
    uint32_t zero = 0; uint16_t op = VIRTIO_VSOCK_OP_CREDIT_UPDATE;
    memcpy(h, e->hdr, HDR);
    memcpy(h + 24, &zero, 4); memcpy(h + 30, &op, 2); memcpy(h + 40, &e->fwd_cnt, 4);
}

/* C gives the connection back with chains held: their bytes are copied out for Python (the
   peer's prebuf: they go to the guest before the socket's), and each chain goes to the guest
   as a CREDIT_UPDATE, which tells it only what it knows. Capturing with no room left, the
   updates still go (they must: the chains are the guest's), their records counted dropped. */
void own_unreserve(vq_tx_ctx *ctx, vq_own *e) {
    if (e->rs_first >= e->rs_n) return;
    uint8_t h[HDR];
    vq_cap *cap = ctx->cap;
    own_update_hdr(e, h);
    for (uint32_t i = e->rs_first; i < e->rs_n; i++) {
        uint8_t *buf = e->rs_buf[i];
        memcpy(e->ra + e->ra_len, buf + HDR, e->rs_len[i]);   /* at most RA_MAX in all */
        e->ra_len += e->rs_len[i];
        memcpy(buf, h, HDR);
        if (cap->mode) {
            if (cap_room_spare(cap, 0, 0)) cap_record(cap, h, h, 0, 0, 0, 0);
            else cap->dropped++;
        }
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
void own_fill(vq_tx_ctx *ctx, vq_own *e) {
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
            /* capturing with no room for the records: RX_LIMIT, and C gives it back below */
            if (e->type == VIRTIO_VSOCK_TYPE_SEQPACKET)   /* whole messages, or Python's (RX_SLOW) */
                vq_rx_fill_seq(ctx->mem, ctx->rx_desc, ctx->rx_avail, ctx->rx_num,
                               ctx->rx_last_avail, n, ctx->rx_used, ctx->rx_used_idx, e->fd, credit - bytes,
                               ctx->rx_max_packets - packets, e->peer_buf_alloc, e->hdr, &res, ctx->cap,
                               e->comment, e->comment_len);
            else
                vq_rx_fill(ctx->mem, ctx->rx_desc, ctx->rx_avail, ctx->rx_num,
                           ctx->rx_last_avail, n, ctx->rx_used, ctx->rx_used_idx, e->fd, credit - bytes,
                           ctx->rx_max_packets - packets, e->hdr, &res, ctx->cap, e->comment, e->comment_len);
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
           Credit left after a burst goes back too: Python serves connections in turn. A
           SEQPACKET connection goes back: C reads no message ahead (Python holds the one it
           delivers in parts, Connection.rx_msg). */
        if (!own_shut(e) || !(e->flags & OWN_F_SELF) || e->type == VIRTIO_VSOCK_TYPE_SEQPACKET) {
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
    if (!vq_rx_put(ctx->mem, ctx->rx_desc, ctx->rx_avail,
                   ctx->rx_num, ctx->rx_last_avail, n, ctx->rx_used, ctx->rx_used_idx, h, ctx->cap))
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
            uint8_t kind = ctx->seg_kind[k];
            iov[m].iov_base = (kind == SEG_SCRATCH ? ctx->scratch : ctx->mem->r[kind].base) + ctx->seg_off[k];
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

/* A SEQPACKET run's messages to the host socket, each one message (a SOCK_SEQPACKET socket takes
   a message whole or not at all), as SeqPacket._send_messages sends them, SEND_IOV to a
   sendmmsg; the record mark is not carried (a unix socket has none, SocketPeer.send_message).
   Returns the messages sent, their bytes in *bytes; *err is set (an errno) only for a failure
   other than a full socket. */
static uint32_t own_send_seq(vq_tx_ctx *ctx, vq_own *e, const vq_item *run, uint64_t *bytes, int *err) {
    struct iovec iov[SEND_IOV];
    struct mmsghdr mm[SEND_IOV];
    uint32_t k = run->seg_first, end = run->seg_first + run->nseg;
    *err = 0; *bytes = 0;
    while (k < end) {
        uint32_t m = 0;
        for (uint32_t j = k; j < end && m < SEND_IOV; j++, m++) {
            uint8_t kind = ctx->seg_kind[j];
            iov[m].iov_base = (kind == SEG_SCRATCH ? ctx->scratch : ctx->mem->r[kind].base) + ctx->seg_off[j];
            iov[m].iov_len = ctx->seg_len[j];
            memset(&mm[m], 0, sizeof mm[m]);
            mm[m].msg_hdr.msg_iov = &iov[m];
            mm[m].msg_hdr.msg_iovlen = 1;
        }
        int n;
        do n = sendmmsg(e->fd, mm, m, MSG_DONTWAIT | MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) *err = errno;
            break;
        }
        for (int j = 0; j < n; j++) *bytes += mm[j].msg_len;
        if (n == 0) break;
        k += (uint32_t)n;   /* fewer than m: the next call says why it stopped (full, or an error) */
    }
    return k - run->seg_first;
}

/* A run of an owned connection all sent: with the update it made due stuck (no rx chain for
   it) the connection is Python's; else its packets opened the guest's window
   (VsockCore._credit_changed), so host data goes. 1: the run is done with. */
static int own_sent(vq_tx_ctx *ctx, vq_own *e, int stuck) {
    e->sends++;
    if (stuck) {
        own_release(ctx, e, OWN_SLOW);
        return 1;
    }
    if (!(e->flags & OWN_F_WAIT) && !own_shut(e)) {
        e->flags &= ~OWN_F_REQUESTED;
        own_fill(ctx, e);
    }
    return 1;
}

/* A SEQPACKET run of an owned connection (every packet a whole message, EOM on it), as
   SeqPacket._guest_seq_rw and _send_messages take it: the credit checked, each message sent
   whole, the bytes counted forwarded once sent (no forwarding ahead: Python counts a message
   when the socket took it), the update that makes due to the guest. What the socket did not
   take goes back as ITEM_TAIL, whole messages, received and counted already. */
static int own_tx_seq(vq_tx_ctx *ctx, vq_own *e, vq_item *run) {
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
    int err;
    uint64_t sent;
    uint32_t msgs = own_send_seq(ctx, e, run, &sent, &err);
    e->fwd_cnt += (uint32_t)sent;
    if (err) {
        e->err = err;
        own_release(ctx, e, OWN_ERROR);   /* Python resets the connection: the data goes with it */
        return 1;
    }
    int stuck = own_update_due(e) && !own_put_update(ctx, e);   /* no rx chain for it: Python's */
    if (msgs < run->nseg) {
        run->seg_first += msgs; run->nseg -= msgs;
        run->total = total - (uint32_t)sent;
        run->kind = ITEM_TAIL;
        own_release(ctx, e, OWN_BLOCKED);
        return 0;
    }
    return own_sent(ctx, e, stuck);
}

/* A run of RW packets of an owned connection with OWN_F_TX, as VsockCore._guest_rw and
   _flush_conn take it: credit checked, the bytes counted forwarded ahead so the update they
   make due reaches the guest before our copy, then sent. Returns 1 when the run is done with
   (sent, or dropped with the connection on a socket error); 0 when it stays an item for
   Python, which then has the connection back: a run beyond the credit we gave (Python resets
   it), or the tail the socket did not take (ITEM_TAIL, trimmed to the unsent bytes). */
int own_tx_run(vq_tx_ctx *ctx, vq_own *e, vq_item *run) {
    if (run->type == VIRTIO_VSOCK_TYPE_SEQPACKET) return own_tx_seq(ctx, e, run);
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
    return own_sent(ctx, e, stuck);
}

/* The host socket of an owned connection waiting for data (OWN_F_WAIT) became readable.
   Returns FILL_WAIT_HOST (1) if C still waits for the socket, FILL_WAIT_GUEST (0) if it keeps the
   connection but waits for the guest's credit (Python stops watching), FILL_BACK (-1) if it gave
   the connection back. */
int vq_own_fill(vq_tx_ctx *ctx, uint32_t slot) {
    ctx->released = ctx->rx_chains = ctx->rx_notifications = ctx->waits = 0;
    if (slot >= ctx->nown || !ctx->own[slot].active) return FILL_BACK;
    vq_own *e = &ctx->own[slot];
    own_fill(ctx, e);
    if (!e->active) return FILL_BACK;
    return (e->flags & OWN_F_WAIT) ? FILL_WAIT_HOST : FILL_WAIT_GUEST;
}
