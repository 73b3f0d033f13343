// A bare TCP round trip over loopback, as the serving benchmark's clients and servers make it: an echo server
// pinned to one CPU, a client pinned to the other, one small message at a time, each side waiting in epoll.
// Prints the median and the 10th and 90th percentiles in microseconds. It is the part of a server's added
// latency at one request at a time that no server can take out on this host.
//
//   cc -O2 -o tcp_rtt tcp_rtt.c && ./tcp_rtt [server_cpu client_cpu [round_trips [bytes]]]
#define _GNU_SOURCE
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof set, &set);
}

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static int wait_readable(int fd) {
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN};
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  return ep;
}

int main(int argc, char** argv) {
  int server_cpu = argc > 2 ? atoi(argv[1]) : 0, client_cpu = argc > 2 ? atoi(argv[2]) : 1;
  int n = argc > 3 ? atoi(argv[3]) : 20000, size = argc > 4 ? atoi(argv[4]) : 256;
  static char buf[1 << 16];
  if (n < 10 || size < 1 || size > (int)sizeof buf) return 2;
  int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof addr;
  if (bind(listener, (struct sockaddr*)&addr, sizeof addr) || getsockname(listener, (struct sockaddr*)&addr, &len) ||
      listen(listener, 1))
    return 1;
  pid_t child = fork();
  if (child == 0) {  // the echo server
    pin(server_cpu);
    int c = accept(listener, NULL, NULL);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int ep = wait_readable(c);
    for (;;) {
      struct epoll_event e;
      epoll_wait(ep, &e, 1, -1);
      ssize_t r = read(c, buf, sizeof buf);
      if (r <= 0 || write(c, buf, r) != r) _exit(0);
    }
  }
  pin(client_cpu);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(s, (struct sockaddr*)&addr, sizeof addr)) return 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int ep = wait_readable(s);
  double* t = malloc(sizeof(double) * n);
  memset(buf, 'x', size);
  for (int i = 0; i < n; i++) {
    double t0 = now_us();
    if (write(s, buf, size) != size) return 1;
    for (int got = 0; got < size;) {
      struct epoll_event e;
      epoll_wait(ep, &e, 1, -1);
      ssize_t r = read(s, buf, sizeof buf);
      if (r <= 0) return 1;
      got += (int)r;
    }
    t[i] = now_us() - t0;
  }
  close(s);
  waitpid(child, NULL, 0);
  qsort(t, n, sizeof(double), by_value);
  printf("p50 %.1f p10 %.1f p90 %.1f\n", t[n / 2], t[n / 10], t[n * 9 / 10]);
  return 0;
}
