/*
 * vsockmon_cap: guest-side helper that records what the kernel's vsockmon
 * device sees, for the kernel-written capture fixture
 * (captures/kernel-vsockmon-loopback.pcap, tests/e2e/test_kernel_capture.py).
 *
 * Runs only inside the QEMU test guest; AF_VSOCK is used only there.
 * Built with `gcc -static -O2 -o vsockmon_cap vsockmon_cap.c` by tests/guest/build.sh.
 *
 * Modes (status lines go to stderr, each flushed at once):
 *
 *   capture IFACE [MAXPACKETS [SECONDS]]
 *       Open an AF_PACKET SOCK_RAW socket bound to IFACE (a vsockmon link, made
 *       with `ip link add name vsockmon0 type vsockmon; ip link set vsockmon0 up`)
 *       and write a classic pcap to stdout: LINKTYPE_VSOCK (271), microsecond
 *       timestamps from the kernel (SO_TIMESTAMP), snaplen 65535, frames exactly
 *       as the kernel hands them to packet taps (af_vsockmon_hdr, virtio header,
 *       payload).  Prints `CAPTURING <iface>` once bound.  Stops on SIGINT or
 *       SIGTERM (after taking the packets already queued on the socket), after
 *       MAXPACKETS packets (0 = no limit, the default) or after SECONDS
 *       (default 60); then prints `CAPTURED <n>`.
 *
 *   echo-pair stream|seqpacket PORT MESSAGE
 *       One echo exchange over the loopback transport (CID 1) whose packets
 *       come in the same order on every run (vsock_tool's echo server
 *       half-closes and exits while its client closes: which close the kernel
 *       handles first varies).  Listens on PORT, forks a client that connects
 *       to 1:PORT, sends MESSAGE (SEQPACKET: one record, MSG_EOR) and reads the
 *       echo.  The server echoes until EOF, then closes.  A STREAM client
 *       half-closes after the echo and waits for EOF, which it sees only after
 *       the kernel handled the server's close (and answered it with RST);
 *       then it closes.  A SEQPACKET client closes after the echo; the server
 *       sees EOF only after the kernel handled that close.  Prints
 *       `ECHO-PAIR <stream|seqpacket> <nbytes echoed>`.
 *
 * Exit codes: 0 ok, 1 usage or system error, 3 echo mismatch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/vm_sockets.h>

#define LINKTYPE_VSOCK 271
#define SNAPLEN 65535
#define ECHO_MAX 4096

static void die(const char *what)
{
	int e = errno;
	fprintf(stderr, "ERROR %s: %s\n", what, strerror(e));
	exit(1);
}

static unsigned long parse_ul(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 0);
	if (errno || !*s || *end) {
		fprintf(stderr, "ERROR bad %s: %s\n", what, s);
		exit(1);
	}
	return v;
}

static void put32(uint8_t *p, uint32_t v)
{
	/* pcap fields in little-endian, whatever the host (x86 here anyway). */
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void write_out(const void *b, size_t n)
{
	if (fwrite(b, 1, n, stdout) != n)
		die("write");
}

/* ---------- capture ---------- */

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static void write_pcap_header(void)
{
	uint8_t h[24];
	put32(h, 0xa1b2c3d4);	/* microsecond timestamps */
	put16(h + 4, 2);
	put16(h + 6, 4);
	put32(h + 8, 0);	/* thiszone */
	put32(h + 12, 0);	/* sigfigs */
	put32(h + 16, SNAPLEN);
	put32(h + 20, LINKTYPE_VSOCK);
	write_out(h, sizeof h);
}

/* Take one packet off fd and append it as a pcap record; 0 when none was queued. */
static int take_packet(int fd, int flags)
{
	static uint8_t frame[SNAPLEN];
	union {
		char buf[CMSG_SPACE(sizeof(struct timeval))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = {.iov_base = frame, .iov_len = sizeof frame};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
			     .msg_controllen = sizeof ctl.buf};
	/* MSG_TRUNC: the return value is the frame's real length even when cut. */
	ssize_t n = recvmsg(fd, &msg, flags | MSG_TRUNC);
	if (n < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
			return 0;
		die("recvmsg");
	}
	struct timeval tv = {0, 0};
	int have_ts = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_TIMESTAMP) {
			memcpy(&tv, CMSG_DATA(c), sizeof tv);
			have_ts = 1;
		}
	}
	if (!have_ts)
		gettimeofday(&tv, NULL);
	uint32_t incl = (size_t)n < sizeof frame ? (uint32_t)n : (uint32_t)sizeof frame;
	uint8_t rec[16];
	put32(rec, (uint32_t)tv.tv_sec);
	put32(rec + 4, (uint32_t)tv.tv_usec);
	put32(rec + 8, incl);
	put32(rec + 12, (uint32_t)n);
	write_out(rec, sizeof rec);
	write_out(frame, incl);
	return 1;
}

static int mode_capture(const char *ifname, unsigned long maxpkts, unsigned long seconds)
{
	unsigned int ifindex = if_nametoindex(ifname);
	if (!ifindex)
		die(ifname);
	/* Protocol 0 until bound: a socket opened with ETH_P_ALL would queue packets
	 * of every interface until bind() narrows it to one. */
	int fd = socket(AF_PACKET, SOCK_RAW, 0);
	if (fd < 0)
		die("socket(AF_PACKET)");
	int on = 1;
	if (setsockopt(fd, SOL_SOCKET, SO_TIMESTAMP, &on, sizeof on) < 0)
		die("SO_TIMESTAMP");
	struct sockaddr_ll sll;
	memset(&sll, 0, sizeof sll);
	sll.sll_family = AF_PACKET;
	sll.sll_protocol = htons(ETH_P_ALL);
	sll.sll_ifindex = (int)ifindex;
	if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0)
		die("bind(AF_PACKET)");

	/* No SA_RESTART: the signal must wake poll(). */
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_stop;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	write_pcap_header();
	fflush(stdout);
	fprintf(stderr, "CAPTURING %s\n", ifname);

	struct timespec t0, now;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	unsigned long count = 0;
	while (!stop_requested && (!maxpkts || count < maxpkts)) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		long left_ms = (long)seconds * 1000 - ((now.tv_sec - t0.tv_sec) * 1000 +
						       (now.tv_nsec - t0.tv_nsec) / 1000000);
		if (left_ms <= 0)
			break;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int r = poll(&p, 1, left_ms > 1000 ? 1000 : (int)left_ms);
		if (r < 0 && errno != EINTR)
			die("poll");
		if (r > 0)
			count += (unsigned long)take_packet(fd, MSG_DONTWAIT);
	}
	/* Packets the kernel queued before the stop belong to the capture. */
	while ((!maxpkts || count < maxpkts) && take_packet(fd, MSG_DONTWAIT))
		count++;
	if (fflush(stdout) != 0)
		die("write");
	fprintf(stderr, "CAPTURED %lu\n", count);
	close(fd);
	return 0;
}

/* ---------- one echo exchange over CID 1 ---------- */

static int recv_some(int fd, char *buf, size_t n)
{
	ssize_t r;
	do
		r = recv(fd, buf, n, 0);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		die("recv");
	return (int)r;
}

static void send_all(int fd, const char *buf, size_t n, int flags)
{
	while (n) {
		ssize_t w = send(fd, buf, n, flags);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			die("send");
		}
		buf += w;
		n -= (size_t)w;
	}
}

/* Connect, send the message, read its echo; a STREAM client then half-closes and
 * reads to EOF.  Exit status 0, or 3 when the echo differs. */
static int pair_client(int type, uint32_t port, const char *message)
{
	int fd = socket(AF_VSOCK, type, 0);
	if (fd < 0)
		die("socket(AF_VSOCK)");
	struct timeval tv = {.tv_sec = 20, .tv_usec = 0}; /* TCG guests are slow */
	setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
	struct sockaddr_vm sa;
	memset(&sa, 0, sizeof sa);
	sa.svm_family = AF_VSOCK;
	sa.svm_cid = VMADDR_CID_LOCAL;
	sa.svm_port = port;
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		die("connect");
	size_t len = strlen(message);
	send_all(fd, message, len, type == SOCK_SEQPACKET ? MSG_EOR : 0);
	char buf[ECHO_MAX];
	size_t got = 0;
	do {
		int r = recv_some(fd, buf + got, sizeof buf - got);
		if (r == 0)
			break;
		got += (size_t)r;
	} while (type == SOCK_STREAM && got < len);
	if (type == SOCK_STREAM) {
		if (shutdown(fd, SHUT_WR) < 0)
			die("shutdown");
		char tail[64];
		while (recv_some(fd, tail, sizeof tail) > 0)
			;
	}
	close(fd);
	return got == len && !memcmp(buf, message, len) ? 0 : 3;
}

static int mode_echo_pair(const char *kind, uint32_t port, const char *message)
{
	int type = !strcmp(kind, "stream") ? SOCK_STREAM : !strcmp(kind, "seqpacket") ? SOCK_SEQPACKET : -1;
	if (type < 0 || strlen(message) > ECHO_MAX) {
		fprintf(stderr, "ERROR echo-pair wants stream|seqpacket and at most %d bytes\n", ECHO_MAX);
		return 1;
	}
	int lfd = socket(AF_VSOCK, type, 0);
	if (lfd < 0)
		die("socket(AF_VSOCK)");
	struct sockaddr_vm sa;
	memset(&sa, 0, sizeof sa);
	sa.svm_family = AF_VSOCK;
	sa.svm_cid = VMADDR_CID_ANY;
	sa.svm_port = port;
	if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0)
		die("bind");
	/* Listening before the fork: the client's connect cannot race the listen. */
	if (listen(lfd, 1) < 0)
		die("listen");
	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		close(lfd);
		_exit(pair_client(type, port, message));
	}
	int fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		die("accept");
	close(lfd);
	/* Echo until the client's EOF, then close.  The server never half-closes
	 * and closes only after the client's EOF, and the client learns of that
	 * close only once the kernel has handled it: the packets at the end of the
	 * connection come in one order only (see the header comment). */
	char buf[ECHO_MAX];
	size_t total = 0;
	int r;
	while ((r = recv_some(fd, buf, sizeof buf)) > 0) {
		send_all(fd, buf, (size_t)r, type == SOCK_SEQPACKET ? MSG_EOR : 0);
		total += (size_t)r;
	}
	close(fd);
	int status;
	if (waitpid(pid, &status, 0) < 0)
		die("waitpid");
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "ECHO-PAIR-FAIL %s client status %d\n", kind, status);
		return 3;
	}
	fprintf(stderr, "ECHO-PAIR %s %zu\n", kind, total);
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: vsockmon_cap capture IFACE [MAXPACKETS [SECONDS]] >FILE.pcap\n"
		"       vsockmon_cap echo-pair stream|seqpacket PORT MESSAGE\n");
	exit(1);
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc < 2)
		usage();
	const char *m = argv[1];
	if (!strcmp(m, "capture") && argc >= 3 && argc <= 5)
		return mode_capture(argv[2], argc >= 4 ? parse_ul(argv[3], "maxpackets") : 0,
				    argc >= 5 ? parse_ul(argv[4], "seconds") : 60);
	if (!strcmp(m, "echo-pair") && argc == 5)
		return mode_echo_pair(argv[2], (uint32_t)parse_ul(argv[3], "port"), argv[4]);
	usage();
	return 1;
}
