/* The link-layer header of the capture records the C paths write, with the values and
   spelling of Linux's include/uapi/linux/vsockmon.h: struct af_vsockmon_hdr, 32 bytes,
   little-endian: src_cid le64 (offset 0), dst_cid le64 (8), src_port le32 (16), dst_port le32
   (20), op le16 (24), transport le16 (26), len le16 (28, the transport header's length),
   reserved (30). And the op the kernel writes in it for each virtio op
   (net/vmw_vsock/virtio_transport_common.c, virtio_transport_build_skb). The same table in
   Python: vsproxy/capture/format.py (MON_OP_OF_VIRTIO); tests/test_c_headers.py checks that
   they agree. */
#ifndef VSPROXY_VSOCKMON_H
#define VSPROXY_VSOCKMON_H

#include "virtio_vsock.h"

#define AF_VSOCKMON_HDR_LEN 32   /* sizeof(struct af_vsockmon_hdr) */

enum af_vsockmon_op {
    AF_VSOCK_OP_UNKNOWN = 0,
    AF_VSOCK_OP_CONNECT = 1,
    AF_VSOCK_OP_DISCONNECT = 2,
    AF_VSOCK_OP_CONTROL = 3,
    AF_VSOCK_OP_PAYLOAD = 4,
};

enum af_vsockmon_transport {
    AF_VSOCK_TRANSPORT_UNKNOWN = 0,
    AF_VSOCK_TRANSPORT_NO_INFO = 1,   /* No transport information */
    /* Transport header type: struct virtio_vsock_hdr */
    AF_VSOCK_TRANSPORT_VIRTIO = 2,
};

/* virtio op -> af_vsockmon_op, an initializer for an array of VSOCKMON_OP_OF_VIRTIO_N entries
   indexed by the virtio op: REQUEST/RESPONSE CONNECT, RST/SHUTDOWN DISCONNECT, RW PAYLOAD,
   CREDIT_UPDATE/REQUEST CONTROL, anything else UNKNOWN. */
#define VSOCKMON_OP_OF_VIRTIO_N (VIRTIO_VSOCK_OP_CREDIT_REQUEST + 1)
#define VSOCKMON_OP_OF_VIRTIO { \
    [VIRTIO_VSOCK_OP_INVALID] = AF_VSOCK_OP_UNKNOWN, \
    [VIRTIO_VSOCK_OP_REQUEST] = AF_VSOCK_OP_CONNECT, \
    [VIRTIO_VSOCK_OP_RESPONSE] = AF_VSOCK_OP_CONNECT, \
    [VIRTIO_VSOCK_OP_RST] = AF_VSOCK_OP_DISCONNECT, \
    [VIRTIO_VSOCK_OP_SHUTDOWN] = AF_VSOCK_OP_DISCONNECT, \
    [VIRTIO_VSOCK_OP_RW] = AF_VSOCK_OP_PAYLOAD, \
    [VIRTIO_VSOCK_OP_CREDIT_UPDATE] = AF_VSOCK_OP_CONTROL, \
    [VIRTIO_VSOCK_OP_CREDIT_REQUEST] = AF_VSOCK_OP_CONTROL, \
}

#endif
