/* Capture records (capture.h). */
#include "capture.h"

static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

void cap_record(vq_cap *cap, const uint8_t *h, const uint8_t *payload, uint32_t plen, int inbound,
                const uint8_t *comment, uint32_t clen) {
    uint8_t *p = cap->buf + cap->used;
    if (clen > CAP_COMMENT_MAX) clen = CAP_COMMENT_MAX;
    /* snaplen: the record keeps the payload's first bytes (captured length), and says how long
       the frame was (original length), as pcap and pcapng do */
    uint32_t keep = cap_keep(cap, plen), orig = MON + HDR + plen, frame = MON + HDR + keep,
             rec = cap_record_size(cap, plen, clen);
    uint8_t *f;
    if (cap->mode == CAP_PCAP) {
        put32(p, (uint32_t)(cap->ts_us / 1000000)); put32(p + 4, (uint32_t)(cap->ts_us % 1000000));
        put32(p + 8, frame); put32(p + 12, orig);
        f = p + 16;
    } else {
        put32(p, PCAPNG_BT_EPB); put32(p + 4, rec); put32(p + 8, cap->iface);
        put32(p + 12, (uint32_t)(cap->ts_us >> 32)); put32(p + 16, (uint32_t)cap->ts_us);
        put32(p + 20, frame); put32(p + 24, orig);
        f = p + 28;
        uint8_t *o = f + ((frame + 3) & ~3u);
        memset(f + frame, 0, ((frame + 3) & ~3u) - frame);
        put32(o, PCAPNG_EPB_FLAGS | (4u << 16)); put32(o + 4, inbound ? PCAPNG_EPB_INBOUND : PCAPNG_EPB_OUTBOUND);
        o += 8;
        if (clen) {   /* opt_comment, as format.pcapng_epb_parts writes it after epb_flags */
            uint32_t padded = (clen + 3) & ~3u;
            put32(o, PCAPNG_OPT_COMMENT | (clen << 16));
            memcpy(o + 4, comment, clen);
            memset(o + 4 + clen, 0, padded - clen);
            o += 4 + padded;
        }
        put32(o, 0);
        put32(o + 4, rec);
    }
    /* af_vsockmon_hdr: cids and ports from the virtio header, transport VIRTIO, and the op as
       Linux maps it (vsockmon.h) */
    memcpy(f, h, 24);  /* src_cid, dst_cid (le64), src_port, dst_port (le32): same offsets */
    uint16_t vop;
    memcpy(&vop, h + 30, 2);
    static const uint16_t mon_op[VSOCKMON_OP_OF_VIRTIO_N] = VSOCKMON_OP_OF_VIRTIO;
    uint16_t op = vop < VSOCKMON_OP_OF_VIRTIO_N ? mon_op[vop] : AF_VSOCK_OP_UNKNOWN, tr = AF_VSOCK_TRANSPORT_VIRTIO,
             tl = HDR, z = 0;
    memcpy(f + 24, &op, 2); memcpy(f + 26, &tr, 2); memcpy(f + 28, &tl, 2); memcpy(f + 30, &z, 2);
    memcpy(f + MON, h, HDR);
    memcpy(f + MON + HDR, payload, keep);
    cap->used += rec;
    cap->records++;
}
