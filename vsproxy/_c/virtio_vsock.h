/* The virtio-vsock and virtqueue names the C paths use, with the values and spelling of Linux's
   include/uapi/linux/virtio_vsock.h (packet types, ops, SHUTDOWN and RW flags) and
   include/uapi/linux/virtio_ring.h (descriptor and ring flags). The same values in Python:
   vsproxy/vsock/header.py, vsproxy/virtq.py and vsproxy/simguest/ring.py; tests/test_c_headers.py
   checks that they agree.

   struct virtio_vsock_hdr is 44 bytes, packed, little-endian: src_cid le64 (offset 0), dst_cid
   le64 (8), src_port le32 (16), dst_port le32 (20), len le32 (24), type le16 (28), op le16 (30),
   flags le32 (32), buf_alloc le32 (36), fwd_cnt le32 (40). The C reads and writes its fields with
   memcpy at these offsets (the C paths run on little-endian hosts only). */
#ifndef VSPROXY_VIRTIO_VSOCK_H
#define VSPROXY_VIRTIO_VSOCK_H

/* virtio_vsock.h */
#define VIRTIO_VSOCK_HDR_LEN 44   /* sizeof(struct virtio_vsock_hdr) */

enum virtio_vsock_type {
    VIRTIO_VSOCK_TYPE_STREAM = 1,
    VIRTIO_VSOCK_TYPE_SEQPACKET = 2,
};

enum virtio_vsock_op {
    VIRTIO_VSOCK_OP_INVALID = 0,
    /* Connect operations */
    VIRTIO_VSOCK_OP_REQUEST = 1,
    VIRTIO_VSOCK_OP_RESPONSE = 2,
    VIRTIO_VSOCK_OP_RST = 3,
    VIRTIO_VSOCK_OP_SHUTDOWN = 4,
    /* To send payload */
    VIRTIO_VSOCK_OP_RW = 5,
    /* Tell the peer our credit info */
    VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6,
    /* Request the peer to send the credit info to us */
    VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7,
};

/* VIRTIO_VSOCK_OP_SHUTDOWN flags values */
enum virtio_vsock_shutdown {
    VIRTIO_VSOCK_SHUTDOWN_RCV = 1,
    VIRTIO_VSOCK_SHUTDOWN_SEND = 2,
};

/* VIRTIO_VSOCK_OP_RW flags values */
enum virtio_vsock_rw {
    VIRTIO_VSOCK_SEQ_EOM = 1,
    VIRTIO_VSOCK_SEQ_EOR = 2,
};

/* virtio_ring.h */
/* This marks a buffer as continuing via the next field. */
#define VRING_DESC_F_NEXT 1
/* This marks a buffer as write-only (otherwise read-only). */
#define VRING_DESC_F_WRITE 2
/* This means the buffer contains a list of buffer descriptors. */
#define VRING_DESC_F_INDIRECT 4

/* The device uses this in used->flags to advise the driver: don't kick me when you add a
   buffer. */
#define VRING_USED_F_NO_NOTIFY 1
/* The driver uses this in avail->flags to advise the device: don't interrupt me when you
   consume a buffer. */
#define VRING_AVAIL_F_NO_INTERRUPT 1

#endif
