/*
 * nsm_tool: reads PCRs from a Nitro Secure Module (/dev/nsm), for the vsproxy enclave tests.
 *
 * Runs inside an enclave booted on QEMU's nitro-enclave machine with a kernel that has the NSM
 * driver (Linux >= 6.8, drivers/misc/nsm.c, CONFIG_NSM; tests/guest/build-nsm.sh). QEMU extends
 * PCR0/1/2 with the EIF's hashes at reset (hw/i386/nitro_enclave.c) and answers the NSM API
 * over its virtio-nsm device (hw/virtio/virtio-nsm.c); the driver passes a request through
 * unchanged with ioctl NSM_IOCTL_RAW. Built with `gcc -static -O2 -o nsm_tool nsm_tool.c` by
 * tests/guest/build.sh.
 *
 *   describe-pcr N...   for each index: sends {"DescribePCR": {"index": N}} and prints
 *                       `PCR<N> <96 lowercase hex digits> lock=<true|false>`; a response that
 *                       is an NSM error prints `NSM-ERROR <N> <error name>`, exit 3
 *   encode INDEX        (host-side tests) prints the request for INDEX in hex
 *   decode HEX          (host-side tests) decodes HEX as a DescribePCR response, printed as
 *                       above with N = -; exit 3 for an NSM error, 4 for a malformed response
 *
 * Every failure is one line on stderr and a non-zero exit (2: device/ioctl, 3: the NSM's
 * error, 4: a response that is not the CBOR we expect).
 *
 * The CBOR (RFC 8949) is encoded and decoded by hand: only the items these two messages use
 * (maps, text and byte strings of definite length, unsigned integers, true/false), each read
 * with a bounds check against the response length.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/*
 * From include/uapi/linux/nsm.h (Linux 6.8+; Debian bookworm's linux-libc-dev 6.1 has no such
 * header, so the ABI is written out here, field for field):
 *   #define NSM_MAGIC 0x0A
 *   #define NSM_REQUEST_MAX_SIZE 0x1000
 *   #define NSM_RESPONSE_MAX_SIZE 0x3000
 *   struct nsm_iovec { __u64 addr; __u64 len; };
 *   struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; };
 *   #define NSM_IOCTL_RAW _IOWR(NSM_MAGIC, 0x0, struct nsm_raw)
 * The driver copies request.len bytes to the device and sets response.len to the length of
 * the device's answer (drivers/misc/nsm.c, nsm_dev_ioctl / parse_resp_raw).
 */
#define NSM_MAGIC 0x0A
#define NSM_REQUEST_MAX_SIZE 0x1000
#define NSM_RESPONSE_MAX_SIZE 0x3000

struct nsm_iovec {
	uint64_t addr; /* virtual address of the buffer */
	uint64_t len;  /* length of the buffer */
};

struct nsm_raw {
	struct nsm_iovec request;  /* from user */
	struct nsm_iovec response; /* to user */
};

#define NSM_IOCTL_RAW _IOWR(NSM_MAGIC, 0x0, struct nsm_raw)

#define PCR_LEN 48 /* SHA-384 */

/* ---- CBOR encoding ------------------------------------------------------------------------ */

/* A head of major type MAJOR with argument ARG (RFC 8949 3.1), for ARG < 256: enough here. */
static size_t put_head(uint8_t *out, unsigned major, unsigned arg)
{
	if (arg < 24) {
		out[0] = (uint8_t)(major << 5 | arg);
		return 1;
	}
	out[0] = (uint8_t)(major << 5 | 24);
	out[1] = (uint8_t)arg;
	return 2;
}

static size_t put_text(uint8_t *out, const char *s)
{
	size_t n = strlen(s);
	size_t h = put_head(out, 3, (unsigned)n);
	memcpy(out + h, s, n);
	return h + n;
}

/* {"DescribePCR": {"index": INDEX}}; QEMU wants the index as a one-byte unsigned integer
 * (cbor_int_get_width == CBOR_INT_8, which both 0x00-0x17 and 0x18 NN are). */
static size_t encode_describe_pcr(uint8_t *out, unsigned index)
{
	size_t n = 0;
	n += put_head(out + n, 5, 1);
	n += put_text(out + n, "DescribePCR");
	n += put_head(out + n, 5, 1);
	n += put_text(out + n, "index");
	n += put_head(out + n, 0, index);
	return n;
}

/* ---- CBOR decoding ------------------------------------------------------------------------ */

struct reader {
	const uint8_t *p;
	size_t len;
	size_t pos;
	const char *err; /* first error, or NULL */
};

static int fail(struct reader *r, const char *why)
{
	if (!r->err)
		r->err = why;
	return -1;
}

/* Reads one head: its major type into *major, its argument into *arg. Indefinite lengths and
 * the reserved additional-information values are refused. */
static int get_head(struct reader *r, unsigned *major, uint64_t *arg)
{
	if (r->pos >= r->len)
		return fail(r, "truncated: expected an item");
	uint8_t b = r->p[r->pos++];
	unsigned ai = b & 0x1f;
	*major = b >> 5;
	if (ai < 24) {
		*arg = ai;
		return 0;
	}
	if (ai > 27)
		return fail(r, "indefinite length or reserved additional information");
	size_t n = (size_t)1 << (ai - 24);
	if (r->len - r->pos < n)
		return fail(r, "truncated: in an item's head");
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++)
		v = v << 8 | r->p[r->pos++];
	*arg = v;
	return 0;
}

/* A text or byte string (MAJOR 3 or 2): points *s at its bytes inside the buffer. */
static int get_string(struct reader *r, unsigned want_major, const uint8_t **s, size_t *n)
{
	unsigned major;
	uint64_t arg;
	if (get_head(r, &major, &arg))
		return -1;
	if (major != want_major)
		return fail(r, want_major == 3 ? "expected a text string" : "expected a byte string");
	if (arg > r->len - r->pos)
		return fail(r, "truncated: a string runs past the end");
	*s = r->p + r->pos;
	*n = (size_t)arg;
	r->pos += (size_t)arg;
	return 0;
}

static int get_map(struct reader *r, uint64_t *pairs)
{
	unsigned major;
	if (get_head(r, &major, pairs))
		return -1;
	if (major != 5)
		return fail(r, "expected a map");
	return 0;
}

static int text_is(const uint8_t *s, size_t n, const char *want)
{
	return n == strlen(want) && memcmp(s, want, n) == 0;
}

/* Skips one item that is not a container (a key we do not know may carry any of these). */
static int skip_scalar(struct reader *r)
{
	unsigned major;
	uint64_t arg;
	size_t save = r->pos;
	if (get_head(r, &major, &arg))
		return -1;
	switch (major) {
	case 0: case 1: case 7:
		return 0;
	case 2: case 3:
		if (arg > r->len - r->pos)
			return fail(r, "truncated: a string runs past the end");
		r->pos += (size_t)arg;
		return 0;
	default:
		r->pos = save;
		return fail(r, "unexpected array, map or tag under an unknown key");
	}
}

struct pcr_reply {
	int is_error;
	char error[64]; /* the NSM's error name when is_error */
	uint8_t data[PCR_LEN];
	int lock;
};

/* Decodes {"DescribePCR": {"data": bytes(48), "lock": bool}} (keys in any order, unknown keys
 * skipped) or {"Error": text}. Returns 0, or -1 with r->err set. */
static int decode_describe_pcr(struct reader *r, struct pcr_reply *out)
{
	uint64_t pairs;
	const uint8_t *k;
	size_t kn;
	memset(out, 0, sizeof *out);
	out->lock = -1;
	if (get_map(r, &pairs))
		return -1;
	if (pairs != 1)
		return fail(r, "the response map does not have one key");
	if (get_string(r, 3, &k, &kn))
		return -1;
	if (text_is(k, kn, "Error")) {
		const uint8_t *e;
		size_t en;
		if (get_string(r, 3, &e, &en))
			return -1;
		if (en >= sizeof out->error)
			en = sizeof out->error - 1;
		for (size_t i = 0; i < en; i++)
			out->error[i] = (e[i] >= 0x20 && e[i] < 0x7f) ? (char)e[i] : '?';
		out->is_error = 1;
	} else if (text_is(k, kn, "DescribePCR")) {
		int have_data = 0;
		if (get_map(r, &pairs))
			return -1;
		if (pairs > 16)
			return fail(r, "too many keys in DescribePCR");
		for (uint64_t i = 0; i < pairs; i++) {
			if (get_string(r, 3, &k, &kn))
				return -1;
			if (text_is(k, kn, "data")) {
				const uint8_t *d;
				size_t dn;
				if (get_string(r, 2, &d, &dn))
					return -1;
				if (dn != PCR_LEN)
					return fail(r, "data is not 48 bytes");
				memcpy(out->data, d, PCR_LEN);
				have_data = 1;
			} else if (text_is(k, kn, "lock")) {
				if (r->pos >= r->len)
					return fail(r, "truncated: expected lock");
				uint8_t b = r->p[r->pos++];
				if (b != 0xf4 && b != 0xf5)
					return fail(r, "lock is not true or false");
				out->lock = b == 0xf5;
			} else if (skip_scalar(r)) {
				return -1;
			}
		}
		if (!have_data || out->lock < 0)
			return fail(r, "DescribePCR without data or lock");
	} else {
		return fail(r, "the response is neither DescribePCR nor Error");
	}
	if (r->pos != r->len)
		return fail(r, "bytes after the response");
	return 0;
}

/* ---- output and I/O ---------------------------------------------------------------------- */

static int print_reply(const char *index, const struct pcr_reply *rep)
{
	if (rep->is_error) {
		printf("NSM-ERROR %s %s\n", index, rep->error);
		fflush(stdout);
		return 3;
	}
	printf("PCR%s ", index);
	for (int i = 0; i < PCR_LEN; i++)
		printf("%02x", rep->data[i]);
	printf(" lock=%s\n", rep->lock ? "true" : "false");
	fflush(stdout);
	return 0;
}

static int parse_index(const char *s, unsigned *out)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v > 255) {
		fprintf(stderr, "nsm_tool: bad PCR index %s (0-255)\n", s);
		return -1;
	}
	*out = (unsigned)v;
	return 0;
}

static int describe_pcrs(int argc, char **argv)
{
	int fd = open("/dev/nsm", O_RDWR);
	if (fd < 0) {
		fprintf(stderr, "nsm_tool: open /dev/nsm: %s\n", strerror(errno));
		return 2;
	}
	int rc = 0;
	for (int a = 0; a < argc && rc == 0; a++) {
		unsigned index;
		if (parse_index(argv[a], &index))
			return 1;
		static uint8_t req[NSM_REQUEST_MAX_SIZE], resp[NSM_RESPONSE_MAX_SIZE];
		struct nsm_raw raw = {
			.request = {(uint64_t)(uintptr_t)req, encode_describe_pcr(req, index)},
			.response = {(uint64_t)(uintptr_t)resp, sizeof resp},
		};
		if (ioctl(fd, NSM_IOCTL_RAW, &raw) < 0) {
			fprintf(stderr, "nsm_tool: ioctl NSM_IOCTL_RAW: %s\n", strerror(errno));
			return 2;
		}
		if (raw.response.len > sizeof resp) {
			fprintf(stderr, "nsm_tool: response length %llu > buffer\n",
				(unsigned long long)raw.response.len);
			return 4;
		}
		struct reader r = {resp, (size_t)raw.response.len, 0, NULL};
		struct pcr_reply rep;
		if (decode_describe_pcr(&r, &rep)) {
			fprintf(stderr, "nsm_tool: PCR%u: bad response at byte %zu: %s\n", index, r.pos, r.err);
			return 4;
		}
		rc = print_reply(argv[a], &rep);
	}
	close(fd);
	return rc;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int decode_hex(const char *hex)
{
	static uint8_t buf[NSM_RESPONSE_MAX_SIZE];
	size_t n = strlen(hex);
	if (n % 2 || n / 2 > sizeof buf) {
		fprintf(stderr, "nsm_tool: decode: odd length or more than %d bytes\n", NSM_RESPONSE_MAX_SIZE);
		return 1;
	}
	for (size_t i = 0; i < n / 2; i++) {
		int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
		if (hi < 0 || lo < 0) {
			fprintf(stderr, "nsm_tool: decode: not hex\n");
			return 1;
		}
		buf[i] = (uint8_t)(hi << 4 | lo);
	}
	struct reader r = {buf, n / 2, 0, NULL};
	struct pcr_reply rep;
	if (decode_describe_pcr(&r, &rep)) {
		fprintf(stderr, "nsm_tool: bad response at byte %zu: %s\n", r.pos, r.err);
		return 4;
	}
	return print_reply("-", &rep);
}

int main(int argc, char **argv)
{
	if (argc >= 3 && strcmp(argv[1], "describe-pcr") == 0)
		return describe_pcrs(argc - 2, argv + 2);
	if (argc == 3 && strcmp(argv[1], "encode") == 0) {
		unsigned index;
		uint8_t req[32];
		if (parse_index(argv[2], &index))
			return 1;
		size_t n = encode_describe_pcr(req, index);
		for (size_t i = 0; i < n; i++)
			printf("%02x", req[i]);
		printf("\n");
		return 0;
	}
	if (argc == 3 && strcmp(argv[1], "decode") == 0)
		return decode_hex(argv[2]);
	fprintf(stderr, "usage: nsm_tool describe-pcr N... | encode N | decode HEX\n");
	return 1;
}
