// What a raw tap RX loop pays for reading as vutap must, on this host: one `read` into one
// contiguous buffer, or a `readv` over the guest buffers a frame fills plus a spill tail (vutap's
// read window and spill tail) under a seccomp filter (as vutap's workers run), with the frames
// checked by the reader itself or by a thread on the other CPU (as a guest reads what the backend
// wrote). Prints the reader's CPU per frame.
//
//   gcc -O2 -pthread scripts/probes/tap-read-path.c -o /tmp/tap-read-path
//   /tmp/tap-read-path TAPNAME READV(0|1) SECCOMP(0|1) REMOTE(0|1) [FRAME_LEN [BUF_LEN]]  # root; 5 s
//
// It creates the tap TAPNAME (gone when the probe exits); a source thread on CPU 1 floods it with
// FRAME_LEN-byte frames (default 60) through an AF_PACKET socket bound to it, the reader runs on
// CPU 0. Buffers are BUF_LEN bytes (default 2048) one after another, as a guest's mergeable RX
// buffers; a frame takes as many consecutive ones as it fills (one iovec each with READV=1).
#define _GNU_SOURCE
#include "tap-probe.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/seccomp.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BUFFERS 256 // a ring's worth of guest buffers
#define HDR_LEN 12  // virtio_net_hdr_mrg_rxbuf, as vutap sets
#define BATCH 32
#define MAX_SEGS 64

static unsigned char *bufs; // BUFFERS slots of buf_len bytes, and room for a frame past the last
static size_t buf_len = 2048, frame_len = 60, per = 1; // per: buffers a frame fills
static unsigned char spill[65536];
static atomic_uint_fast64_t filled, consumed;
static atomic_int stop;
static int ifindex;

// Reads the header and the first bytes of a frame, as a guest checking it would.
static unsigned char *slot(uint64_t i) { return bufs + (i % BUFFERS) * buf_len; }

static uint64_t check(const unsigned char *b) {
    uint64_t x = 0;
    for (int i = 0; i < HDR_LEN + 60; i += 8) x += *(const uint64_t *)(b + i);
    return x;
}

static void *source(void *arg) {
    (void)arg;
    pin(1);
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6};
    unsigned char f[65536] = {0};
    memcpy(f, "\x02\0\0\0\0\x02", 6);
    memcpy(f + 6, "\x02\0\0\0\0\x01", 6);
    f[12] = 0x88, f[13] = 0xb5; // local experimental ethertype
    while (!stop) {
        for (int i = 0; i < 64; i++) sendto(s, f, frame_len, 0, (void *)&to, sizeof to);
        sched_yield(); // leaves the CPU to the consumer now and then, as the bench's source does
    }
    return NULL;
}

static void *consumer(void *arg) {
    (void)arg;
    pin(1);
    uint64_t next = 0, sum = 0;
    while (!stop) {
        uint64_t upto = atomic_load_explicit(&filled, memory_order_acquire);
        for (; next < upto; next++) sum += check(slot(next * per));
        atomic_store_explicit(&consumed, next, memory_order_release);
        sched_yield();
    }
    return (void *)(uintptr_t)sum;
}

int main(int argc, char **argv) {
    if (argc < 5 || argc > 7) {
        fprintf(stderr, "usage: %s TAPNAME READV SECCOMP REMOTE [FRAME_LEN [BUF_LEN]]\n", argv[0]);
        return 2;
    }
    int use_readv = atoi(argv[2]), use_seccomp = atoi(argv[3]), remote = atoi(argv[4]);
    if (argc > 5) frame_len = atoi(argv[5]);
    if (argc > 6) buf_len = atoi(argv[6]);
    // Slots per frame: the buffers the frame (and its header) fills, as a guest's mergeable RX.
    per = (HDR_LEN + frame_len + buf_len - 1) / buf_len;
    if (frame_len < 60 || frame_len > 65535 - HDR_LEN || buf_len < 64 || per >= MAX_SEGS || per > BUFFERS / 4) {
        fprintf(stderr, "FRAME_LEN 60..65523 in at most %d buffers of BUF_LEN\n", MAX_SEGS - 1);
        return 2;
    }
    bufs = aligned_alloc(4096, ((BUFFERS + per) * buf_len + 4095) & ~(size_t)4095);
    memset(bufs, 0, (BUFFERS + per) * buf_len);
    pin(0);
    int fd = open_probe_tap(argv[1], HDR_LEN, frame_len, &ifindex);
    if (fd < 0) return 1;
    if (use_seccomp && allow_all_seccomp() < 0) return 1;
    pthread_t src, con;
    pthread_create(&src, NULL, source, NULL);
    if (remote) pthread_create(&con, NULL, consumer, NULL);
    usleep(300000);
    uint64_t frames = 0, sum = 0, cpu0 = now_ns(CLOCK_THREAD_CPUTIME_ID), t0 = now_ns(CLOCK_MONOTONIC);
    while (now_ns(CLOCK_MONOTONIC) - t0 < 5000000000ull) {
        if (remote && (frames - atomic_load_explicit(&consumed, memory_order_acquire)) * per > BUFFERS - BATCH * per) {
            sched_yield(); // every buffer is still the consumer's
            continue;
        }
        int n = 0;
        for (; n < BATCH; n++) {
            // A frame's buffers are consecutive from slot frames * per; past the last slot come spares.
            unsigned char *b = slot(frames * per);
            struct iovec iov[MAX_SEGS];
            for (size_t i = 0; i < per; i++) iov[i] = (struct iovec){b + i * buf_len, buf_len};
            iov[per] = (struct iovec){spill, sizeof spill};
            ssize_t got = use_readv ? readv(fd, iov, per + 1) : read(fd, b, per * buf_len);
            if (got <= HDR_LEN) break;
            if (!remote) sum += check(b);
            frames++;
        }
        if (remote) atomic_store_explicit(&filled, frames, memory_order_release);
        if (n == 0) {
            struct pollfd p = {fd, POLLIN, 0};
            poll(&p, 1, 20);
        }
    }
    uint64_t cpu = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0, wall = now_ns(CLOCK_MONOTONIC) - t0;
    stop = 1;
    printf("readv=%d seccomp=%d remote=%d frame=%zu buf=%zu (%zu a frame): %.3f Mpps, reader %.0f ns CPU per frame (%.2f cores)\n",
           use_readv, use_seccomp, remote, frame_len, buf_len, per, frames * 1e3 / wall, (double)cpu / frames,
           (double)cpu / wall);
    return sum == 1; // keeps the checks from being optimised away
}
