// What the bench's ping-pong pays on this host for the hops a vhost-user round trip adds to the
// raw loop's: a flag handed between two CPUs that both spin on it (a frontend and a polling
// backend passing a ring entry), and a flag handed between two threads that share one CPU and
// yield it between looks (the bench's frontend and far-side reflector on the load CPU).
// Prints the median and 99th percentile round trip of each, in ns.
//
//   gcc -O2 -pthread scripts/probes/handoff.c -o /tmp/handoff
//   /tmp/handoff            # 2 x 200000 round trips, a few seconds
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ROUNDS 200000

static _Atomic uint64_t ball; // odd: the pinger's turn is over, the ponger's to answer
static int yield_between_looks;

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0) {
    perror("pthread_setaffinity_np");
    exit(1);
  }
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void wait_for(uint64_t value) {
  while (atomic_load_explicit(&ball, memory_order_acquire) != value)
    if (yield_between_looks)
      sched_yield();
}

static void *ponger(void *arg) {
  pin(*(int *)arg);
  for (uint64_t i = 0; i < ROUNDS; i++) {
    wait_for(2 * i + 1);
    atomic_store_explicit(&ball, 2 * i + 2, memory_order_release);
  }
  return NULL;
}

static int by_value(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

static void run(const char *what, int ping_cpu, int pong_cpu, int yield) {
  static uint64_t rtt[ROUNDS];
  pthread_t t;
  atomic_store(&ball, 0);
  yield_between_looks = yield;
  if (pthread_create(&t, NULL, ponger, &pong_cpu) != 0) {
    perror("pthread_create");
    exit(1);
  }
  pin(ping_cpu);
  for (uint64_t i = 0; i < ROUNDS; i++) {
    uint64_t t0 = now_ns();
    atomic_store_explicit(&ball, 2 * i + 1, memory_order_release);
    wait_for(2 * i + 2);
    rtt[i] = now_ns() - t0;
  }
  pthread_join(t, NULL);
  qsort(rtt, ROUNDS, sizeof(rtt[0]), by_value);
  printf("%-44s p50 %6lu ns  p99 %6lu ns\n", what, (unsigned long)rtt[ROUNDS / 2], (unsigned long)rtt[ROUNDS * 99 / 100]);
}

int main(void) {
  run("two CPUs, both spinning", 0, 1, 0);
  run("one CPU, two threads yielding between looks", 1, 1, 1);
  return 0;
}
