/* A tx kick served in C while C runs connections (own.c), captured as the batches are. */
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
    for (int armed = 0, rounds = 0, spun = 0;;) {
        if (++rounds > 16) { status = KICK_PUMP; break; }  /* a guest that never stops: the loop's other fds get a turn */
        if (cap->mode && cap->size - cap->used < CAP_LOW) { status = KICK_PUMP; break; }
        uint16_t avail_idx = __atomic_load_n(&ctx->avail[1], __ATOMIC_ACQUIRE);
        uint32_t n = (uint16_t)(avail_idx - ctx->tx_last_avail);
        if (n > num) { status = KICK_PUMP; break; }
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
        int count = vq_tx_batch(ctx, ctx->tx_last_avail, n, cap);
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

