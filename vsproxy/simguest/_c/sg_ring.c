/* The simulated guest's kicks and waits (sg.h). */
#include <poll.h>
#include <unistd.h>

#include "sg.h"

void sg_kick(uint8_t *mem, sg_ring *r, int event_idx, uint64_t *kicks) {
    uint16_t new_idx = r->avail_idx, old = r->kicked_idx;
    if (new_idx == old) return;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* avail->idx before reading avail_event */
    r->kicked_idx = new_idx;
    int want = event_idx ? sg_need_event(ld16(mem, r->avail_event_w), new_idx, old)
                         : !(ld16(mem, r->used_idx_w - 1) & VRING_USED_F_NO_NOTIFY);  /* used->flags */
    if (want) {
        uint64_t one = 1;
        if (write(r->kick_fd, &one, 8) == 8) (*kicks)++;
    }
}

int sg_wait(const int *fds, uint32_t n, int timeout_ms, uint64_t *interrupts) {
    struct pollfd p[16];
    if (n > 16) n = 16;
    for (uint32_t k = 0; k < n; k++) { p[k].fd = fds[k]; p[k].events = POLLIN; p[k].revents = 0; }
    int got = poll(p, n, timeout_ms);
    if (got == 0) return 1;
    for (uint32_t k = 0; k < n; k++) {
        if (p[k].revents & POLLIN) {
            uint64_t v;
            if (read(p[k].fd, &v, 8) == 8) (*interrupts)++;
        }
    }
    return 0;
}
