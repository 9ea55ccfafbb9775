// The least CPU per frame a virtio RX backend can spend on this host, against a raw tap loop's:
// the floor under vutap's RX cells. It runs one of two readers on CPU 0 for 5 s and prints its
// CPU per frame:
//
//   raw     the benchmark's ceiling: one `read` per frame into consecutive buffers, nobody
//           notified, nothing else;
//   virtio  a backend that does only what any virtio-net RX backend must, and nothing vutap
//           does beyond it: a split ring of 256 one-descriptor mergeable buffers that a "guest"
//           thread on CPU 1 posts, checks and reposts (in batches past half its NAPI budget,
//           last freed first, each descriptor written again, as a Linux guest and the
//           benchmark's frontend do), sleeping on a call eventfd under EVENT_IDX; the backend
//           reads the avail index once per run of buffers, each buffer's ring entry and
//           descriptor (checked: in range, device-writable, no next or indirect), takes a frame
//           with one `readv` over the buffers it fills plus a spill tail, under a seccomp
//           filter, writes `num_buffers` and the used entries, and per pass of at most 128
//           frames or 3/4 of the ring publishes the used index once and writes the call eventfd
//           if the guest's `used_event` asks for it; out of buffers, it asks for a kick
//           (`avail_event`) and waits for it. It knows the frame size (the window is exact),
//           keeps no counters beyond its own, and never validates more than that.
//
// FLOOR_NO_SECCOMP=1 leaves the filter out, FLOOR_READ=1 reads a frame that fits one buffer with
// a `read` into it (no spill tail): each sizes its part of the floor.
//
//   gcc -O2 -pthread scripts/probes/virtio-rx-floor.c -o /tmp/virtio-rx-floor
//   /tmp/virtio-rx-floor TAPNAME raw|virtio [FRAME_LEN [BUF_LEN]]   # root; 5 s
//
// It creates the tap TAPNAME (gone when the probe exits); a source thread on CPU 1 floods it
// through an AF_PACKET socket with FRAME_LEN-byte frames (default 60) in BUF_LEN-byte buffers
// (default 1536; 4096 for 9000 B frames, as a Linux guest posts them), sharing that CPU with the
// guest thread as the benchmark's source shares it with its frontend.
#define _GNU_SOURCE
#include "tap-probe.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define QSZ 256
#define HDR_LEN 12 // virtio_net_hdr_mrg_rxbuf
#define PASS 128   // frames per pass: one used-index update and at most one interrupt
#define PASS_BUFS (QSZ * 3 / 4) // and at most 3/4 of the ring, so the guest refills while it is read
#define MAX_SEGS 64
#define NAPI_BUDGET 64
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};
struct avail {
    _Atomic uint16_t flags, idx;
    uint16_t ring[QSZ];
    _Atomic uint16_t used_event;
};
struct used_elem {
    uint32_t id, len;
};
struct used {
    _Atomic uint16_t flags, idx;
    struct used_elem ring[QSZ];
    _Atomic uint16_t avail_event;
};

// Guest memory: the descriptor table, the avail ring, the used ring, then the buffers. Guest
// addresses are offsets into it.
enum { DESC_AT = 0, AVAIL_AT = 4096, USED_AT = 8192, BUFS_AT = 16384 };
static unsigned char *mem;
static size_t mem_len, buf_len = 1536, frame_len = 60, per = 1;
static struct desc *descs;
static struct avail *avail;
static struct used *used;
static int call_fd, kick_fd, tap_fd, ifindex;
static atomic_int stop;
static atomic_uint_fast64_t guest_frames, kicks;
// Parts of the floor that can be left out, to size each one (environment, 1 = leave out):
// FLOOR_NO_SECCOMP, FLOOR_READ (a `read` into the one buffer of a frame that fits one, no spill).
static int no_seccomp, plain_read;

// virtio's vring_need_event: has the used index passed `event` going from `old` to `new`?
static int need_event(uint16_t event, uint16_t new, uint16_t old) {
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

static void *source(void *arg) {
    (void)arg;
    pin(1);
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6};
    static unsigned char f[65536];
    memcpy(f, "\x02\0\0\0\0\x02", 6);
    memcpy(f + 6, "\x02\0\0\0\0\x01", 6);
    f[12] = 0x88, f[13] = 0xb5; // local experimental ethertype
    bind(s, (void *)&to, sizeof to);
    struct iovec iov = {f, frame_len};
    struct mmsghdr msgs[64];
    for (int i = 0; i < 64; i++) msgs[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &iov, .msg_iovlen = 1}};
    while (!stop) // as the bench's source: batches of 64, the CPU given up only when none went
        if (sendmmsg(s, msgs, 64, 0) <= 0) sched_yield();
    return NULL;
}

// The guest: takes frames off the used ring, reads each one's header and first bytes, reposts
// the buffers once more than half a NAPI budget is free, kicks if the backend asked, and sleeps
// on the call eventfd when the ring is empty (EVENT_IDX, as NAPI re-arms its interrupt).
static void *guest(void *arg) {
    (void)arg;
    pin(1);
    uint16_t last_used = 0, avail_idx = QSZ, free_ids[QSZ], nfree = 0;
    uint64_t sum = 0, frames = 0;
    while (!stop) {
        uint16_t u = atomic_load_explicit(&used->idx, memory_order_acquire);
        int any = 0;
        while (last_used != u) {
            struct used_elem e = used->ring[last_used % QSZ];
            const unsigned char *b = mem + descs[e.id].addr;
            uint16_t nb = *(const uint16_t *)(b + 10);
            for (int i = 0; i < HDR_LEN + 60; i += 8) sum += *(const uint64_t *)(b + i);
            for (uint16_t k = 0; k < nb && last_used != u; k++) {
                free_ids[nfree++] = used->ring[last_used % QSZ].id;
                last_used++;
            }
            frames++;
            any = 1;
        }
        if (nfree > NAPI_BUDGET / 2) {
            uint16_t old = avail_idx;
            // Last freed first (Linux's free descriptor list is a stack), each descriptor written
            // again, as Linux's virtqueue_add does.
            for (uint16_t i = nfree; i-- > 0;) {
                uint16_t id = free_ids[i];
                descs[id] = (struct desc){BUFS_AT + (uint64_t)id * buf_len, buf_len, F_WRITE, 0};
                avail->ring[avail_idx++ % QSZ] = id;
            }
            nfree = 0;
            atomic_store_explicit(&avail->idx, avail_idx, memory_order_release);
            atomic_thread_fence(memory_order_seq_cst);
            if (need_event(atomic_load_explicit(&used->avail_event, memory_order_relaxed), avail_idx, old)) {
                eventfd_write(kick_fd, 1);
                kicks++;
            }
        }
        atomic_store_explicit(&guest_frames, frames, memory_order_relaxed);
        if (any) continue;
        atomic_store_explicit(&avail->used_event, last_used, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load_explicit(&used->idx, memory_order_acquire) != last_used) continue;
        struct pollfd p = {call_fd, POLLIN, 0};
        if (poll(&p, 1, 10) > 0) {
            eventfd_t v;
            eventfd_read(call_fd, &v);
        }
    }
    return (void *)(uintptr_t)sum;
}

struct result {
    uint64_t frames, irqs, passes, no_bufs, bad;
};

// The raw loop: one `read` per frame into the next consecutive buffers, poll when empty.
static void raw_reader(struct result *r, uint64_t until) {
    uint64_t next = 0;
    while (now_ns(CLOCK_MONOTONIC) < until) {
        int n = 0;
        for (; n < 32; n++) {
            unsigned char *b = mem + BUFS_AT + (next % QSZ) * buf_len;
            ssize_t got = read(tap_fd, b, QSZ * buf_len + 65536 - (next % QSZ) * buf_len);
            if (got <= HDR_LEN) break;
            next += (got + buf_len - 1) / buf_len;
            r->frames++;
        }
        if (n == 0) {
            struct pollfd p = {tap_fd, POLLIN, 0};
            poll(&p, 1, 20);
        }
    }
}

// The virtio backend: see the top of the file for what it does and does not do.
static void virtio_reader(struct result *r, uint64_t until) {
    static unsigned char spill[65536];
    uint16_t last_avail = 0, avail_seen = 0, used_idx = 0;
    uint16_t heads[MAX_SEGS];
    struct iovec iov[MAX_SEGS + 1];
    while (now_ns(CLOCK_MONOTONIC) < until) {
        uint16_t old_used = used_idx;
        int empty = 0, no_bufs = 0;
        for (int f = 0; f < PASS && (uint16_t)(used_idx - old_used) + per <= PASS_BUFS; f++) {
            if ((uint16_t)(avail_seen - last_avail) < per) {
                avail_seen = atomic_load_explicit(&avail->idx, memory_order_acquire);
                if ((uint16_t)(avail_seen - last_avail) < per) {
                    no_bufs = 1;
                    break;
                }
            }
            size_t k = 0;
            for (; k < per; k++) {
                uint16_t head = avail->ring[(uint16_t)(last_avail + k) % QSZ];
                if (head >= QSZ) break;
                struct desc d;
                memcpy(&d, (const void *)&descs[head], sizeof d); // 16 bytes, as vm-memory reads one
                if (d.flags != F_WRITE || d.len < HDR_LEN || d.addr > mem_len || d.len > mem_len - d.addr) break;
                heads[k] = head;
                iov[k] = (struct iovec){mem + d.addr, d.len};
            }
            if (k < per) { // a bad chain: this probe's guest never posts one
                r->bad++;
                stop = 1;
                return;
            }
            iov[per] = (struct iovec){spill, sizeof spill};
            ssize_t n = plain_read && per == 1 ? read(tap_fd, iov[0].iov_base, iov[0].iov_len) : readv(tap_fd, iov, per + 1);
            if (n <= HDR_LEN) {
                empty = 1;
                break;
            }
            uint16_t nb = (n + buf_len - 1) / buf_len;
            *(uint16_t *)((unsigned char *)iov[0].iov_base + 10) = nb;
            for (uint16_t j = 0; j < nb; j++) {
                size_t left = n - j * buf_len;
                used->ring[(uint16_t)(used_idx + j) % QSZ] = (struct used_elem){heads[j], left < buf_len ? left : buf_len};
            }
            used_idx += nb;
            last_avail += nb;
            r->frames++;
        }
        if (used_idx != old_used) {
            r->passes++;
            atomic_store_explicit(&used->idx, used_idx, memory_order_release);
            atomic_thread_fence(memory_order_seq_cst);
            if (need_event(atomic_load_explicit(&avail->used_event, memory_order_relaxed), used_idx, old_used)) {
                eventfd_write(call_fd, 1);
                r->irqs++;
            }
        }
        if (no_bufs) { // ask for a kick, look once more, then wait for it
            r->no_bufs++;
            atomic_store_explicit(&used->avail_event, avail_seen, memory_order_relaxed); // kick once past it
            atomic_thread_fence(memory_order_seq_cst);
            if ((uint16_t)(atomic_load_explicit(&avail->idx, memory_order_acquire) - last_avail) >= per) continue;
            struct pollfd p = {kick_fd, POLLIN, 0};
            if (poll(&p, 1, 20) > 0) {
                eventfd_t v;
                eventfd_read(kick_fd, &v);
            }
        } else if (empty) {
            struct pollfd p = {tap_fd, POLLIN, 0};
            poll(&p, 1, 20);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 5 || (strcmp(argv[2], "raw") && strcmp(argv[2], "virtio"))) {
        fprintf(stderr, "usage: %s TAPNAME raw|virtio [FRAME_LEN [BUF_LEN]]\n", argv[0]);
        return 2;
    }
    int virtio = !strcmp(argv[2], "virtio");
    no_seccomp = getenv("FLOOR_NO_SECCOMP") && atoi(getenv("FLOOR_NO_SECCOMP"));
    plain_read = getenv("FLOOR_READ") && atoi(getenv("FLOOR_READ"));
    if (argc > 3) frame_len = atoi(argv[3]);
    if (argc > 4) buf_len = atoi(argv[4]);
    per = (HDR_LEN + frame_len + buf_len - 1) / buf_len;
    if (frame_len < 60 || frame_len > 65535 - HDR_LEN || buf_len < 64 || per >= MAX_SEGS || per > QSZ / 4) {
        fprintf(stderr, "FRAME_LEN 60..65523 in at most %d buffers of BUF_LEN\n", MAX_SEGS - 1);
        return 2;
    }
    mem_len = BUFS_AT + QSZ * buf_len + 65536;
    mem = mmap(NULL, mem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    descs = (struct desc *)(mem + DESC_AT);
    avail = (struct avail *)(mem + AVAIL_AT);
    used = (struct used *)(mem + USED_AT);
    for (uint16_t i = 0; i < QSZ; i++) {
        descs[i] = (struct desc){BUFS_AT + (uint64_t)i * buf_len, buf_len, F_WRITE, 0};
        avail->ring[i] = i;
    }
    atomic_store(&avail->idx, QSZ);
    call_fd = eventfd(0, EFD_NONBLOCK);
    kick_fd = eventfd(0, EFD_NONBLOCK);
    pin(0);
    tap_fd = open_probe_tap(argv[1], HDR_LEN, frame_len, &ifindex);
    if (tap_fd < 0) return 1;
    if (virtio && !no_seccomp && allow_all_seccomp() < 0) return 1;
    pthread_t src, gst;
    pthread_create(&src, NULL, source, NULL);
    if (virtio) pthread_create(&gst, NULL, guest, NULL);
    usleep(300000);
    struct result r = {0};
    uint64_t cpu0 = now_ns(CLOCK_THREAD_CPUTIME_ID), t0 = now_ns(CLOCK_MONOTONIC);
    (virtio ? virtio_reader : raw_reader)(&r, t0 + 5000000000ull);
    uint64_t cpu = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0, wall = now_ns(CLOCK_MONOTONIC) - t0;
    stop = 1;
    if (virtio) pthread_join(gst, NULL);
    printf("%s%s%s frame=%zu buf=%zu (%zu a frame): %.3f Mpps, reader %.0f ns CPU per frame (%.2f cores)", argv[2],
           no_seccomp ? " no-seccomp" : "", plain_read ? " read" : "", frame_len, buf_len, per, r.frames * 1e3 / wall, (double)cpu / r.frames, (double)cpu / wall);
    if (virtio)
        printf(", %.1f frames/pass, %.4f irqs/frame, %.3f no-buf/1k, %.4f kicks/frame, guest checked %llu of %llu",
               (double)r.frames / r.passes, (double)r.irqs / r.frames, r.no_bufs * 1e3 / r.frames,
               (double)kicks / r.frames, (unsigned long long)guest_frames, (unsigned long long)r.frames);
    printf("\n");
    return r.bad ? 1 : 0;
}
