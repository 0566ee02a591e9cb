/* Split virtqueues as the C paths read them (virtio 1.x 2.7; vsproxy/virtq.py is the Python
   walker they defer to): descriptors, the rx chain shape a Linux guest posts, publishing the
   used index. */
#ifndef VSPROXY_RING_H
#define VSPROXY_RING_H

#include <string.h>
#include <unistd.h>

#include "fastpath.h"
#include "virtio_vsock.h"

#define HDR VIRTIO_VSOCK_HDR_LEN
#define MAX_PKT 65536   /* Linux VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest payload of a packet */

static inline int in_region(uint64_t addr, uint64_t len, uint64_t gpa, uint64_t size) {
    return addr >= gpa && len <= size && addr - gpa <= size - len;
}

_Static_assert(sizeof(((vq_mem *)0)->r) / sizeof(vq_region) == VQ_MAX_REGIONS, "vq_mem holds VQ_MAX_REGIONS");

/* Where guest range [addr, addr + len) is mapped, if it lies entirely inside one region of the
   memory table (as GuestMemory.gpa_view: a buffer that crosses a region's end, wraps, or falls
   in a hole between regions is no buffer); 0 if not. The region the last lookup hit is looked
   at first: a guest's buffers mostly lie in one region. On a hit, mem->last is its index. */
static inline uint8_t *gpa_ptr(vq_mem *mem, uint64_t addr, uint64_t len) {
    const vq_region *r = &mem->r[mem->last];
    if (__builtin_expect(in_region(addr, len, r->gpa, r->size), 1)) return r->base + (addr - r->gpa);
    for (uint32_t k = 0; k < mem->n; k++) {
        r = &mem->r[k];
        if (in_region(addr, len, r->gpa, r->size)) {
            mem->last = k;
            return r->base + (addr - r->gpa);
        }
    }
    return 0;
}

/* struct vring_desc: addr le64, len le32, flags le16, next le16 */
static inline void rd_desc(const uint8_t *p, uint64_t *addr, uint32_t *len, uint16_t *flags, uint16_t *next) {
    memcpy(addr, p, 8); memcpy(len, p + 8, 4); memcpy(flags, p + 12, 2); memcpy(next, p + 14, 2);
}

/* Avail entry idx, if it names a chain of the Linux rx shape: one writable descriptor inside
   one region with room for more than a header. Its head, buffer and length; 0 if not. */
static inline int rx_linux_chain(vq_mem *mem, const uint8_t *desc, const uint16_t *avail, uint32_t num,
                                 uint16_t idx, uint16_t *head, uint8_t **buf, uint32_t *len) {
    uint16_t h = __atomic_load_n(&avail[2 + (idx & (num - 1))], __ATOMIC_ACQUIRE);
    if (h >= num) return 0;
    uint64_t a; uint32_t l; uint16_t f, nx;
    rd_desc(desc + 16 * (uint64_t)h, &a, &l, &f, &nx);
    if (f != VRING_DESC_F_WRITE || l <= HDR) return 0;
    uint8_t *p = gpa_ptr(mem, a, l);
    if (!p) return 0;
    *head = h; *buf = p; *len = l;
    return 1;
}

/* used->idx published, and the guest interrupted if it asked (as SplitQueue.publish).
   Returns 1 if it was interrupted. */
static inline int ring_publish(uint16_t *used_idx_p, const uint16_t *avail, uint32_t num, int event_idx,
                               int call_fd, uint16_t new_idx, uint16_t *signalled) {
    uint16_t old = *signalled;
    if (new_idx == old) return 0;
    __atomic_store_n(used_idx_p, new_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *signalled = new_idx;
    int need;
    if (event_idx) {
        uint16_t ev = __atomic_load_n(&avail[2 + num], __ATOMIC_ACQUIRE);   /* used_event */
        need = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old);
    } else {
        need = !(__atomic_load_n(&avail[0], __ATOMIC_ACQUIRE) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    if (need) {
        uint64_t one = 1;
        ssize_t w = write(call_fd, &one, 8);  /* EAGAIN: the counter is full, an interrupt is pending */
        (void)w;
    }
    return need;
}

#endif
