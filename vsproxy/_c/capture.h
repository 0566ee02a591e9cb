/* Capture records, laid out as vsproxy/capture/format.py writes them: af_vsockmon_hdr
   (vsockmon.h), the 44-byte virtio header, the RW payload; wrapped in a classic pcap record
   header or a pcapng Enhanced Packet Block with epb_flags. */
#ifndef VSPROXY_CAPTURE_H
#define VSPROXY_CAPTURE_H

#include "ring.h"
#include "vsockmon.h"

#define MON AF_VSOCKMON_HDR_LEN
/* pcapng: the Enhanced Packet Block's type, its epb_flags option and the direction in it
   (format.py: BT_EPB, EPB_FLAGS, EPB_INBOUND, EPB_OUTBOUND) */
#define PCAPNG_BT_EPB 6
#define PCAPNG_EPB_FLAGS 2
#define PCAPNG_EPB_INBOUND 1
#define PCAPNG_EPB_OUTBOUND 2

static inline uint32_t cap_record_size(const vq_cap *cap, uint32_t plen) {
    uint32_t frame = MON + HDR + plen;
    if (cap->mode == CAP_PCAP) return 16 + frame;
    /* EPB: 28 fixed + frame padded to 4 + epb_flags option (8) + end of options (4) + trailing length */
    return 28 + ((frame + 3) & ~3u) + 8 + 4 + 4;
}

/* Writes one record: h is the header as vsproxy read it (never re-read from guest memory). */
VSP_INTERNAL void cap_record(vq_cap *cap, const uint8_t *h, const uint8_t *payload, uint32_t plen, int inbound);

#endif
