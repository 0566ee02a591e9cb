/* Host data and control packets into rx chains of the shape a Linux guest posts. */
#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "capture.h"

/* Host data straight from a socket into rx chains of the one shape Linux posts (a single
   writable descriptor inside one memory region). Stops at the first chain of any other shape
   (RX_SLOW, left on the ring for Python), when the socket has no more (RX_AGAIN, or RX_SHORT
   after a short read), at EOF or an error (RX_EOF, RX_ERROR), or at the credit / packet limit
   (RX_LIMIT). One recvmsg fills up to RX_IOV chains: Linux posts 3776-byte buffers, and a
   syscall per buffer would cost more than the copy. Used elements are written; Python
   publishes used->idx and advances its indices. */
#define RX_IOV 64
int vq_rx_fill(vq_mem *mem, const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail, uint32_t avail_n,
               uint32_t *used_ring, uint16_t used_idx,
               int fd, uint32_t credit, uint32_t max_packets, const uint8_t *hdr,
               vq_rx_result *res, vq_cap *cap, const uint8_t *comment, uint32_t comment_len)
{
    if (comment_len > CAP_COMMENT_MAX) comment_len = CAP_COMMENT_MAX;
    res->packets = 0; res->bytes = 0; res->status = RX_LIMIT; res->err = 0;
    while (res->packets < max_packets && credit > 0) {
        struct iovec iov[RX_IOV];
        uint16_t heads[RX_IOV];
        uint32_t m = 0, cap_need = cap->used;
        uint64_t want = 0;
        int slow = 0;
        /* the next chains, each checked, within the credit and the capture buffer */
        while (m < RX_IOV && res->packets + m < max_packets && want < credit) {
            if (res->packets + m >= avail_n) { slow = 1; break; }
            uint16_t head; uint8_t *buf; uint32_t l;
            if (!rx_linux_chain(mem, desc, avail, num, (uint16_t)(last_avail + res->packets + m), &head, &buf, &l)) {
                slow = 1;
                break;
            }
            uint32_t room = l - HDR;
            if (room > MAX_PKT) room = MAX_PKT;
            if (room > credit - want) room = (uint32_t)(credit - want);
            if (cap->mode) {
                if ((uint64_t)cap_need + cap_record_size(cap, room, comment_len) + CAP_SPARE > cap->size) break;
                cap_need += cap_record_size(cap, room, comment_len);
            }
            iov[m].iov_base = buf + HDR;
            iov[m].iov_len = room;
            heads[m] = head;
            want += room;
            m++;
        }
        if (m == 0) { res->status = slow ? RX_SLOW : RX_LIMIT; return 0; }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov; msg.msg_iovlen = m;
        ssize_t n;
        do n = recvmsg(fd, &msg, MSG_DONTWAIT); while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) { res->status = RX_AGAIN; return 0; }
            res->status = RX_ERROR; res->err = errno; return 0;
        }
        if (n == 0) { res->status = RX_EOF; return 0; }
        /* the bytes fill the chains in order: one packet per chain they reached */
        uint64_t left = (uint64_t)n;
        for (uint32_t k = 0; k < m && left; k++) {
            uint32_t len = left < iov[k].iov_len ? (uint32_t)left : (uint32_t)iov[k].iov_len;
            uint8_t *buf = (uint8_t *)iov[k].iov_base - HDR;
            memcpy(buf, hdr, HDR);
            memcpy(buf + 24, &len, 4);
            if (cap->mode) {
                uint8_t h[HDR];
                memcpy(h, hdr, HDR);
                memcpy(h + 24, &len, 4);
                cap_record(cap, h, buf + HDR, len, 0, comment, comment_len);
            }
            uint32_t slot = (uint16_t)(used_idx + res->packets) & (num - 1);
            used_ring[2 * slot] = heads[k];
            used_ring[2 * slot + 1] = HDR + len;
            res->packets++;
            res->bytes += len;
            credit -= len;
            left -= len;
        }
        if ((uint64_t)n < want) { res->status = RX_SHORT; return 0; }
        if (slow) { res->status = RX_SLOW; return 0; }
    }
    return 0;
}

/* SEQPACKET host data: whole messages from a SOCK_SEQPACKET socket, each into as many rx chains
   of the Linux shape as it takes, SEQ_EOM on the last (SeqPacket._rx_seq_chain: the same
   fragment sizes, the buffer's room, the credit, MAX_PKT). The record mark is never set: the
   sockets C reads (a peer's fast_fd) have none. A message's length is peeked first
   (MSG_PEEK | MSG_TRUNC gives the whole length): one longer than msg_limit (the guest's
   buf_alloc; Python refuses it and resets), or one the chains, the credit, the packet limit or
   the capture buffer cannot take whole, stays on the socket and the call ends RX_SLOW: Python's
   walker reads it and delivers it in parts as credit comes (Connection.rx_msg), which C never
   holds. A message of length 0 reads as the end, as Python's SocketPeer.recv_message has it. */
int vq_rx_fill_seq(vq_mem *mem, const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail,
                   uint32_t avail_n, uint32_t *used_ring, uint16_t used_idx,
                   int fd, uint32_t credit, uint32_t max_packets, uint32_t msg_limit, const uint8_t *hdr,
                   vq_rx_result *res, vq_cap *cap, const uint8_t *comment, uint32_t comment_len)
{
    if (comment_len > CAP_COMMENT_MAX) comment_len = CAP_COMMENT_MAX;
    res->packets = 0; res->bytes = 0; res->status = RX_LIMIT; res->err = 0;
    while (res->packets < max_packets && credit > 0) {
        ssize_t len;
        do len = recv(fd, 0, 0, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT); while (len < 0 && errno == EINTR);
        if (len < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) { res->status = RX_AGAIN; return 0; }
            res->status = RX_ERROR; res->err = errno; return 0;
        }
        if (len == 0) { res->status = RX_EOF; return 0; }
        if ((uint64_t)len > msg_limit || (uint64_t)len > credit) { res->status = RX_SLOW; return 0; }
        struct iovec iov[RX_IOV];
        uint16_t heads[RX_IOV];
        uint32_t m = 0, cap_need = cap->used;
        uint64_t want = 0;
        /* chains until the message fits */
        while (want < (uint64_t)len) {
            uint16_t head; uint8_t *buf; uint32_t l;
            if (m == RX_IOV || res->packets + m >= max_packets || res->packets + m >= avail_n
                || !rx_linux_chain(mem, desc, avail, num, (uint16_t)(last_avail + res->packets + m), &head, &buf, &l)) {
                res->status = RX_SLOW;
                return 0;
            }
            uint32_t room = l - HDR;
            if (room > MAX_PKT) room = MAX_PKT;
            if (room > (uint64_t)len - want) room = (uint32_t)((uint64_t)len - want);
            if (cap->mode) {
                if ((uint64_t)cap_need + cap_record_size(cap, room, comment_len) + CAP_SPARE > cap->size) {
                    res->status = RX_LIMIT;
                    return 0;
                }
                cap_need += cap_record_size(cap, room, comment_len);
            }
            iov[m].iov_base = buf + HDR;
            iov[m].iov_len = room;
            heads[m] = head;
            want += room;
            m++;
        }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov; msg.msg_iovlen = m;
        ssize_t n;
        do n = recvmsg(fd, &msg, MSG_DONTWAIT); while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) { res->status = RX_AGAIN; return 0; }
            res->status = RX_ERROR; res->err = errno; return 0;
        }
        if (n != len || (msg.msg_flags & MSG_TRUNC)) {
            /* not the message peeked (another reader of the socket): its bytes are lost either
               way, as a message cut short; the connection is reset */
            res->status = RX_ERROR; res->err = EMSGSIZE; return 0;
        }
        for (uint32_t k = 0; k < m; k++) {
            uint32_t plen = (uint32_t)iov[k].iov_len, flags = k + 1 == m ? VIRTIO_VSOCK_SEQ_EOM : 0;
            uint8_t *buf = (uint8_t *)iov[k].iov_base - HDR, h[HDR];
            memcpy(h, hdr, HDR);
            memcpy(h + 24, &plen, 4);
            memcpy(h + 32, &flags, 4);
            memcpy(buf, h, HDR);
            if (cap->mode) cap_record(cap, h, buf + HDR, plen, 0, comment, comment_len);
            uint32_t slot = (uint16_t)(used_idx + res->packets) & (num - 1);
            used_ring[2 * slot] = heads[k];
            used_ring[2 * slot + 1] = HDR + plen;
            res->packets++;
            res->bytes += plen;
        }
        credit -= (uint32_t)n;
    }
    return 0;
}

/* One header-only packet (a control packet) into the next rx chain, if it has the Linux
   shape (one writable descriptor of at least a header, inside one region: the whole buffer, as
   the walker checks it, not only the header's bytes); 0 (nothing written) otherwise, and
   Python's walker takes the chain. */
int vq_rx_put(vq_mem *mem, const uint8_t *desc, const uint16_t *avail, uint32_t num, uint16_t last_avail, uint32_t avail_n,
              uint32_t *used_ring, uint16_t used_idx, const uint8_t *hdr, vq_cap *cap)
{
    if (avail_n == 0) return 0;
    uint16_t head = __atomic_load_n(&avail[2 + (last_avail & (num - 1))], __ATOMIC_ACQUIRE);
    if (head >= num) return 0;
    uint64_t a; uint32_t l; uint16_t f, nx;
    rd_desc(desc + 16 * (uint64_t)head, &a, &l, &f, &nx);
    if (f != VRING_DESC_F_WRITE || l < HDR) return 0;
    uint8_t *buf = gpa_ptr(mem, a, l);
    if (!buf) return 0;
    if (cap->mode && !cap_room(cap, 0, 0)) return 0;
    memcpy(buf, hdr, HDR);
    if (cap->mode) cap_record(cap, hdr, hdr, 0, 0, 0, 0);
    uint32_t slot = used_idx & (num - 1);
    used_ring[2 * slot] = head;
    used_ring[2 * slot + 1] = HDR;
    return 1;
}
