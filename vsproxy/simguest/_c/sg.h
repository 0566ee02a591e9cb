/* What the simulated guest's sender and receiver share: the header fields they look at, and
   the guest's side of a split ring (as SplitRing, vsproxy/simguest/ring.py, keeps it). */
#ifndef VSPROXY_SIMGUEST_SG_H
#define VSPROXY_SIMGUEST_SG_H

#include <string.h>

#include "cblast.h"
#include "virtio_vsock.h"

#define HDR VIRTIO_VSOCK_HDR_LEN
/* Functions one C file calls in another: not exported from the module (built with -fPIC), so
   calls to them are direct, as calls to static functions. */
#define VSP_INTERNAL __attribute__((visibility("hidden")))

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

/* The avail ring's new entries, kicked if the device asked (EVENT_IDX or used->flags) */
VSP_INTERNAL void sg_kick(uint8_t *mem, sg_ring *r, int event_idx, uint64_t *kicks);
/* Wait for an interrupt on any of the call eventfds; 1 on timeout. */
VSP_INTERNAL int sg_wait(const int *fds, uint32_t n, int timeout_ms, uint64_t *interrupts);

#endif
