/* The connections C runs between Python's turns (vq_own, see fastpath.TxFastPath.own): the
   lookups the tx paths make in the table, and the small steps of the pump that tx_batch.c takes
   too (inline here, as they were inlined when the C was one file); the rest is in own.c. */
#ifndef VSPROXY_OWN_H
#define VSPROXY_OWN_H

#include "fastpath.h"

/* The guest's window of e is shut: as much in flight as it allows, or a fwd_cnt claiming more
   than it could have consumed (Credit.peer_free gives such a guest no credit either) */
static inline int own_shut(const vq_own *e) {
    return e->tx_cnt - e->peer_fwd_cnt >= e->peer_buf_alloc;
}

static inline vq_own *own_find(vq_tx_ctx *ctx, uint16_t type, uint32_t src_port, uint64_t dst_cid,
                               uint32_t dst_port) {
    for (uint32_t k = 0, seen = 0; k < ctx->nown && seen < ctx->owned; k++) {
        vq_own *e = &ctx->own[k];
        if (!e->active) continue;
        seen++;
        if (e->type == type && e->guest_port == src_port && e->peer_cid == dst_cid && e->peer_port == dst_port)
            return e;
    }
    return 0;
}

/* 1 if a connection C runs waits for the guest's credit (its window shut) */
static inline int own_awaits_guest(const vq_tx_ctx *ctx) {
    for (uint32_t k = 0, seen = 0; k < ctx->nown && seen < ctx->owned; k++) {
        const vq_own *e = &ctx->own[k];
        if (!e->active) continue;
        seen++;
        if (!(e->flags & OWN_F_WAIT) && own_shut(e)) return 1;
    }
    return 0;
}

/* C gives the connection back with chains held: their bytes are copied out for Python, and each
   chain goes to the guest as a CREDIT_UPDATE (own.c) */
VSP_INTERNAL void own_unreserve(vq_tx_ctx *ctx, vq_own *e);
/* Host data for e into the rx ring, as far as its credit, the burst and the socket go (own.c) */
VSP_INTERNAL void own_fill(vq_tx_ctx *ctx, vq_own *e);
/* A run of e's RW packets (OWN_F_TX) to its host socket; 1 when done with, 0 when it stays an
   item for Python (own.c) */
VSP_INTERNAL int own_tx_run(vq_tx_ctx *ctx, vq_own *e, vq_item *run);

/* C gives e back to Python (why: OWN_*), with what it holds for it */
static inline void own_release(vq_tx_ctx *ctx, vq_own *e, uint32_t why) {
    own_unreserve(ctx, e);
    e->active = 0; e->release = why; ctx->owned--; ctx->released++;
}

static inline void own_release_all(vq_tx_ctx *ctx) {
    for (uint32_t k = 0; k < ctx->nown && ctx->owned; k++)
        if (ctx->own[k].active) own_release(ctx, &ctx->own[k], OWN_ALL);
}

/* A CREDIT_UPDATE for an owned connection, with the effect VsockCore.guest_credit has: the
   guest's credit taken, and if its window opened, host data read into the rx ring at once. */
static inline void own_credit(vq_tx_ctx *ctx, vq_own *e, uint32_t buf_alloc, uint32_t fwd_cnt) {
    e->updates++;
    e->credit_items++;
    e->peer_buf_alloc = buf_alloc;
    e->peer_fwd_cnt = fwd_cnt;
    if (!(e->flags & OWN_F_REQUESTED)) e->flags |= OWN_F_SELF;
    if (own_shut(e)) return;  /* still shut */
    e->flags &= ~OWN_F_REQUESTED;
    own_fill(ctx, e);
}

#endif
