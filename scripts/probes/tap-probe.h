// What the tap probes share: pinning, clocks, the tap they read and the seccomp filter they read
// under. Included by tap-read-path.c and virtio-rx-floor.c (each built alone with gcc).
#pragma once
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/if_tun.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static uint64_t now_ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec * 1000000000ull + t.tv_nsec;
}

// Creates the tap `name` (gone when the probe exits) with a vnet header of `hdr_len` bytes, non
// blocking, up with an MTU that carries `frame_len`-byte frames. Returns its fd and sets
// `*ifindex`, or -1 after saying why.
static int open_probe_tap(const char *name, int hdr_len, size_t frame_len, int *ifindex) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
    struct ifreq req = {0};
    snprintf(req.ifr_name, IFNAMSIZ, "%s", name);
    req.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (fd < 0 || ioctl(fd, TUNSETIFF, &req) < 0 || ioctl(fd, TUNSETVNETHDRSZ, &hdr_len) < 0) {
        perror("tap");
        return -1;
    }
    char cmd[64];
    snprintf(cmd, sizeof cmd, "ip link set %s mtu %zu up", name, frame_len < 1514 ? 1500 : frame_len - 14);
    if (system(cmd) != 0) return -1;
    *ifindex = if_nametoindex(name);
    usleep(300000);
    return fd;
}

// A filter that allows everything: what is measured is the filtered system-call path itself.
static int allow_all_seccomp(void) {
    struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {1, allow};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("seccomp");
        return -1;
    }
    return 0;
}
