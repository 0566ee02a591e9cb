/* Host-side latency tools for benchmarks/bench_latency.py: blocking C loops on one socket
   each, so that the floors and the host ends of the vsproxy rows cost what a C program costs
   (no interpreter between a wake-up and the next system call). */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cblast.h"

#define LAT_MAX 65536
static uint8_t lat_buf[LAT_MAX];

static uint64_t lat_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* all of n bytes out; 0 or an errno */
static int lat_write(int fd, const uint8_t *p, uint32_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        p += w; n -= (uint32_t)w;
    }
    return 0;
}

/* n bytes in; 0, an errno, or -1 at EOF before any byte (a clean end) */
static int lat_read(int fd, uint8_t *p, uint32_t n) {
    uint32_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, p + got, n - got);
        if (r < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (r == 0) return got ? EPIPE : -1;
        got += (uint32_t)r;
    }
    return 0;
}

int lat_ping(int fd, uint64_t n, uint32_t size, uint64_t *times) {
    if (size == 0 || size > LAT_MAX) return EINVAL;
    for (uint64_t i = 0; i < n; i++) {
        memset(lat_buf, (int)(i & 0xff), size);
        uint64_t t0 = lat_now();
        int e = lat_write(fd, lat_buf, size);
        if (!e) e = lat_read(fd, lat_buf, size);
        if (e) return e < 0 ? EPIPE : e;
        times[i] = lat_now() - t0;
    }
    return 0;
}

int lat_echo(int fd, uint64_t n, uint32_t size, uint64_t *rounds) {
    if (size == 0 || size > LAT_MAX) return EINVAL;
    *rounds = 0;
    while (*rounds < n) {
        int e = lat_read(fd, lat_buf, size);
        if (e < 0) return 0;
        if (e) return e;
        if ((e = lat_write(fd, lat_buf, size))) return e;
        (*rounds)++;
    }
    return 0;
}

int lat_relay(int a, int b, uint64_t n, uint32_t size, uint64_t *rounds) {
    if (size == 0 || size > LAT_MAX) return EINVAL;
    *rounds = 0;
    while (*rounds < n) {
        int e = lat_read(a, lat_buf, size);
        if (e < 0) return 0;
        if (e || (e = lat_write(b, lat_buf, size)) || (e = lat_read(b, lat_buf, size))
            || (e = lat_write(a, lat_buf, size)))
            return e < 0 ? EPIPE : e;
        (*rounds)++;
    }
    return 0;
}

int lat_connect(const char *path, uint64_t n, uint64_t *times) {
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa.sun_path) return ENAMETOOLONG;
    strcpy(sa.sun_path, path);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t0 = lat_now();
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0) return errno;
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
            int e = errno;
            close(s);
            return e;
        }
        uint8_t b;
        ssize_t r;
        do r = read(s, &b, 1); while (r < 0 && errno == EINTR);
        times[i] = lat_now() - t0;
        close(s);
        if (r < 0) return errno;
    }
    return 0;
}

int lat_accept(int lfd, uint64_t n, int hello) {
    for (uint64_t i = 0; i < n; i++) {
        int c;
        do c = accept(lfd, 0, 0); while (c < 0 && errno == EINTR);
        if (c < 0) return errno;
        uint8_t b = 1;
        int e = hello ? lat_write(c, &b, 1) : 0;
        close(c);
        if (e) return e;
    }
    return 0;
}
