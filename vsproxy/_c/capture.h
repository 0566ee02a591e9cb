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

/* The longest capture comment C writes (a connection's mark: "rewritten to CID 42 by
   --remap 3=42", a rule's name); fastpath.py CAP_COMMENT_MAX. */
#define CAP_COMMENT_MAX 512
#define PCAPNG_OPT_COMMENT 1
/* Room C keeps in a capture buffer between tx kick rounds: a round stops before it */
#define CAP_LOW 131072

/* the payload bytes a record of plen keeps (snaplen) */
static inline uint32_t cap_keep(const vq_cap *cap, uint32_t plen) {
    return cap->snaplen && plen > cap->snaplen ? cap->snaplen : plen;
}

/* a record's size; clen: its comment's length (pcapng only: classic pcap has no comments) */
static inline uint32_t cap_record_size(const vq_cap *cap, uint32_t plen, uint32_t clen) {
    uint32_t frame = MON + HDR + cap_keep(cap, plen);
    if (cap->mode == CAP_PCAP) return 16 + frame;
    /* EPB: 28 fixed + frame padded to 4 + epb_flags option (8) [+ opt_comment (4 + clen padded)]
       + end of options (4) + trailing length */
    return 28 + ((frame + 3) & ~3u) + 8 + (clen ? 4 + ((clen + 3) & ~3u) : 0) + 4 + 4;
}

/* Rx chains C may hold for connections it runs while capturing (own.c, own_reserve), and the
   room kept for their records: given back, each goes to the guest as a header-only
   CREDIT_UPDATE (at most 120 bytes captured), and those go whatever the capture's room. */
#define CAP_HELD_MAX 256
#define CAP_SPARE 32768
_Static_assert(CAP_SPARE >= CAP_HELD_MAX * 128, "room for the update of every chain held");

/* 1 if a record of plen payload bytes and a clen-byte comment fits, the spare kept */
static inline int cap_room(const vq_cap *cap, uint32_t plen, uint32_t clen) {
    return (uint64_t)cap->used + cap_record_size(cap, plen, clen) + CAP_SPARE <= cap->size;
}

/* the same, the spare included: for the updates of chains given back */
static inline int cap_room_spare(const vq_cap *cap, uint32_t plen, uint32_t clen) {
    return (uint64_t)cap->used + cap_record_size(cap, plen, clen) <= cap->size;
}

/* Writes one record: h is the header as vsproxy read it (never re-read from guest memory);
   comment (clen bytes, at most CAP_COMMENT_MAX) is the packet's capture comment, or none. The
   caller checked the room (cap_room). */
VSP_INTERNAL void cap_record(vq_cap *cap, const uint8_t *h, const uint8_t *payload, uint32_t plen, int inbound,
                             const uint8_t *comment, uint32_t clen);

#endif
