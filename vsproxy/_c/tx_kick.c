/* A tx kick served in C while C runs connections (own.c), captured as the batches are. */
#include <poll.h>
#include <time.h>
#include <unistd.h>

#include "capture.h"
#include "own.h"
#include "ring.h"

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
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

/* --busy-poll: a request/response turn. Once C sent a connection's data to its host socket
   (in this call), the host's answer usually comes within tens of microseconds; once C gave the guest that
   answer, the guest's next request does. Polling for them here, without sleeping, saves
   vsproxy's wake-up (and the trip through Python) on the way in, and makes the peer's system
   call cheaper (no sleeper to wake). The guest's tx ring is watched only after C gave the
   guest host data (*turn): a guest streaming data is better left to fill the ring for one big
   batch. Returns 1 if the guest posted a tx entry or a host socket's data went to the guest
   (own_fill), 2 if that gave a connection back (Python's turn), 0 if nothing came within the
   window. The window adapts: a miss halves it, a hit doubles it (up to poll_ns); once closed,
   every 64th call polls the full window once (a miss closes it again), so a stream that is not
   request/response costs one window in 64 kicks (loop.BusyPoll, the same rule). The time it takes is counted (poll_spent_ns). */
#define POLL_FDS 16
#define POLL_SLOTS 64   /* connections whose sends vq_tx_kick notes at its start (fastpath.OWN_SLOTS) */
static int tx_poll(vq_tx_ctx *ctx, const uint32_t *sends0, int *turn, uint32_t *rx_chains, uint32_t *rx_notifications,
                   uint32_t *waits) {
    struct pollfd p[POLL_FDS];
    vq_own *pe[POLL_FDS];
    uint32_t np = 0;
    for (uint32_t k = 0, seen = 0; k < ctx->nown && seen < ctx->owned && np < POLL_FDS; k++) {
        vq_own *e = &ctx->own[k];
        if (!e->active) continue;
        seen++;
        /* only a socket C sent the guest's data to in this call waits for an answer (a host
           streaming to the guest is read when the loop says so, in bigger pieces) */
        if (!(e->flags & OWN_F_WAIT) || k >= POLL_SLOTS || e->sends == sends0[k]) continue;
        p[np].fd = e->fd; p[np].events = POLLIN; p[np].revents = 0;
        pe[np++] = e;
    }
    if (!np && !*turn) return 0;
    /* the chains taken so far go back before the wait: the guest may be waiting for them */
    ctx->tx_notifications += ring_publish(ctx->tx_used_idx_p, ctx->avail, ctx->num, ctx->tx_event_idx, ctx->tx_call_fd,
                                          ctx->tx_used_idx, &ctx->tx_signalled);
    uint64_t t0 = now_ns(), now = t0, end = t0 + ctx->poll_cur;
    int found = 0;
    do {
        if (*turn) {
            for (int k = 0; k < 32; k++) {
                if (__atomic_load_n(&ctx->avail[1], __ATOMIC_ACQUIRE) != ctx->tx_last_avail) { found = 1; break; }
                __builtin_ia32_pause();
            }
        }
        if (!found && np && poll(p, np, 0) > 0) {
            for (uint32_t i = 0; i < np; i++) {
                if (!p[i].revents || !pe[i]->active) continue;
                ctx->rx_chains = ctx->rx_notifications = ctx->waits = 0;
                own_fill(ctx, pe[i]);
                *rx_chains += ctx->rx_chains;
                *rx_notifications += ctx->rx_notifications;
                *waits += ctx->waits;
                if (ctx->rx_chains) *turn = 1;   /* the guest has its answer: its next request comes */
            }
            found = ctx->released ? 2 : 1;
        }
        now = now_ns();
    } while (!found && now < end);
    ctx->poll_spent_ns += now - t0;
    if (found) {
        ctx->poll_hits++;
        ctx->poll_cur = ctx->poll_cur * 2 < ctx->poll_ns ? ctx->poll_cur * 2 : ctx->poll_ns;
    } else {
        ctx->poll_misses++;
        ctx->poll_cur = ctx->poll_cur >= 4000 && !ctx->poll_probe ? ctx->poll_cur / 2 : 0;
    }
    ctx->poll_probe = 0;
    return found;
}

/* The guest kicked the tx queue of a device whose connections C runs: C reads the kick, takes the chains, and as long as every chain is a credit update it handles
   itself, returns them, publishes, re-enables kicks and looks again, with no turn through
   Python. Returns KICK_DONE when the ring is empty and kicks are on again; KICK_ITEMS when the
   last batch has something for Python (items, kick_items of them, or connections given back:
   its consumed heads are Python's to return); KICK_PUMP when Python's pump must look (an avail
   index jump, a guest still sending after 16 batches, or, capturing, less than CAP_LOW of
   ctx->cap left: Python lends the next buffer). Capture records go to ctx->cap, in ring
   order, as vq_tx_batch writes them. The tx shadows and counters are stored
   back in every case, and waits counts the connections that began waiting for their socket. */
int vq_tx_kick(vq_tx_ctx *ctx) {
    uint64_t v;
    ssize_t r = read(ctx->kick_fd, &v, 8);  /* EAGAIN: a kick read already, or a look without one */
    (void)r;
    uint32_t rx_chains = 0, rx_notifications = 0, waits = 0, num = ctx->num, status = KICK_DONE;
    vq_cap *cap = ctx->cap;
    ctx->tx_chains = ctx->tx_notifications = 0;
    ctx->kick_items = 0;
    ctx->released = ctx->nconsumed = 0;   /* (a poll may give a connection back before any batch) */
    uint64_t start = ctx->poll_ns ? now_ns() : 0;
    if (ctx->poll_ns && !ctx->poll_cur && ++ctx->poll_calls >= 64) {   /* closed: probe again */
        ctx->poll_cur = ctx->poll_ns;
        ctx->poll_calls = 0;
        ctx->poll_probe = 1;
    }
    int turn = 0;   /* C gave the guest host data: poll its tx ring for the next request */
    uint32_t sends0[POLL_SLOTS];   /* each connection's runs sent to its host socket, at the start */
    if (ctx->poll_ns)
        for (uint32_t k = 0; k < ctx->nown && k < POLL_SLOTS; k++) sends0[k] = ctx->own[k].sends;
    for (int armed = 0, rounds = 0, spun = 0;;) {
        if (cap->mode && cap->size - cap->used < CAP_LOW) { status = KICK_PUMP; break; }
        uint16_t avail_idx = __atomic_load_n(&ctx->avail[1], __ATOMIC_ACQUIRE);
        uint32_t n = (uint16_t)(avail_idx - ctx->tx_last_avail);
        if (n > num) { status = KICK_PUMP; break; }
        if (n && ++rounds > 16) { status = KICK_PUMP; break; }  /* a guest that never stops: the loop's other fds get a turn */
        if (n == 0) {
            if (armed) break;
            /* polling goes on for at most 8 windows a call: then the loop's other fds get a turn */
            if (ctx->poll_cur && ctx->owned && now_ns() - start < 8 * (uint64_t)ctx->poll_ns) {
                int got = tx_poll(ctx, sends0, &turn, &rx_chains, &rx_notifications, &waits);
                if (got == 2) { status = KICK_ITEMS; break; }
                if (got) continue;
            }
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
        int count = vq_tx_batch(ctx, ctx->tx_last_avail, n, cap);
        turn = ctx->rx_chains != 0;   /* the batch's data brought host data for the guest at once */
        rx_chains += ctx->rx_chains;
        rx_notifications += ctx->rx_notifications;
        ctx->tx_last_avail += ctx->taken;
        waits += ctx->waits;
        if (count != 0 || ctx->released) { ctx->kick_items = count; status = KICK_ITEMS; break; }
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

