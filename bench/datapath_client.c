/* TCP data-path load generator for bench/datapath.py (compiled by it with gcc).
 *
 *   datapath_client connect DST PORT NPORTS SECONDS [INFLIGHT] [THREADS]
 *       Opens and closes TCP connections to DST:PORT..PORT+NPORTS-1 (round
 *       robin over the ports) as fast as it can for
 *       SECONDS, INFLIGHT connections in flight (non-blocking, epoll), spread
 *       over THREADS threads. Each connection is closed as soon as its
 *       handshake completes, with SO_LINGER 0 (an RST: no TIME_WAIT, so the
 *       client never runs out of ports). A connect that takes longer than
 *       1 s is abandoned and counted as a timeout. Prints one JSON line:
 *       {"mode":"connect","ok":N,"errors":N,"timeouts":N,"seconds":S,"conn_per_s":R}
 *   datapath_client server PORT NPORTS SECONDS [THREADS]
 *       Accepts and closes connections on 0.0.0.0:PORT..PORT+NPORTS-1 for at
 *       most SECONDS.
 *       Prints "ready" once listening.
 *   datapath_client send DST PORT SECONDS
 *       One TCP stream: writes 64 KiB buffers for SECONDS, then closes.
 *   datapath_client sink PORT SECONDS
 *       Accepts one connection, reads it to EOF (at most SECONDS), prints
 *       {"mode":"sink","bytes":N,"seconds":S,"gbit_per_s":R}. Prints "ready"
 *       once listening.
 *
 * Every mode is bounded in time; nothing here runs forever.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_TIMEOUT 1.0

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* --- connect mode -------------------------------------------------------- */

struct cargs {
    struct sockaddr_in dst;
    int base_port, nports, next;
    int inflight;
    double deadline;
    long ok, errors, timeouts;
};

struct slot {
    int fd;
    double started;
};

static int open_one(struct cargs *a, int ep, struct slot *s, long *errors) {
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            (*errors)++;
            return -1;
        }
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        a->dst.sin_port = htons(a->base_port + a->next);
        a->next = (a->next + 1) % a->nports;
        int r = connect(fd, (struct sockaddr *)&a->dst, sizeof a->dst);
        if (r == 0 || errno == EINPROGRESS) {
            s->fd = fd;
            s->started = now();
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
                die("epoll_ctl");
            return 0;
        }
        (*errors)++;
        close(fd);
        if (now() >= a->deadline)
            return -1;
    }
}

static void *connect_loop(void *p) {
    struct cargs *a = p;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    struct slot *slots = calloc(a->inflight, sizeof *slots);
    struct epoll_event *evs = calloc(a->inflight, sizeof *evs);
    long ok = 0, errors = 0, timeouts = 0;
    for (int i = 0; i < a->inflight; i++) {
        slots[i].fd = -1;
        open_one(a, ep, &slots[i], &errors);
    }
    double last_sweep = now();
    for (;;) {
        double t = now();
        if (t >= a->deadline)
            break;
        int n = epoll_wait(ep, evs, a->inflight, 50);
        for (int i = 0; i < n; i++) {
            struct slot *s = evs[i].data.ptr;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err == 0 && !(evs[i].events & (EPOLLERR | EPOLLHUP)))
                ok++;
            else
                errors++;
            close(s->fd); /* SO_LINGER 0: RST */
            s->fd = -1;
            if (now() < a->deadline)
                open_one(a, ep, s, &errors);
        }
        t = now();
        if (t - last_sweep > 0.1) { /* abandon connects stuck in SYN retries */
            last_sweep = t;
            for (int i = 0; i < a->inflight; i++) {
                if (slots[i].fd >= 0 && t - slots[i].started > CONNECT_TIMEOUT) {
                    close(slots[i].fd);
                    slots[i].fd = -1;
                    timeouts++;
                    if (t < a->deadline)
                        open_one(a, ep, &slots[i], &errors);
                }
            }
        }
    }
    for (int i = 0; i < a->inflight; i++)
        if (slots[i].fd >= 0)
            close(slots[i].fd);
    close(ep);
    free(slots);
    free(evs);
    a->ok = ok;
    a->errors = errors;
    a->timeouts = timeouts;
    return NULL;
}

static struct sockaddr_in addr_of(const char *host, const char *port) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        exit(2);
    }
    return sa;
}

static int mode_connect(int argc, char **argv) {
    if (argc < 6)
        return 2;
    int nports = atoi(argv[4]);
    double secs = atof(argv[5]);
    int inflight = argc > 6 ? atoi(argv[6]) : 64;
    int threads = argc > 7 ? atoi(argv[7]) : 1;
    if (threads < 1 || inflight < threads || nports < 1)
        return 2;
    struct cargs *a = calloc(threads, sizeof *a);
    pthread_t *th = calloc(threads, sizeof *th);
    double t0 = now();
    for (int i = 0; i < threads; i++) {
        a[i].dst = addr_of(argv[2], argv[3]);
        a[i].base_port = atoi(argv[3]);
        a[i].nports = nports;
        a[i].next = i % nports;
        a[i].inflight = inflight / threads + (i < inflight % threads);
        a[i].deadline = t0 + secs;
        pthread_create(&th[i], NULL, connect_loop, &a[i]);
    }
    long ok = 0, errors = 0, timeouts = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        ok += a[i].ok;
        errors += a[i].errors;
        timeouts += a[i].timeouts;
    }
    double el = now() - t0;
    printf("{\"mode\": \"connect\", \"ok\": %ld, \"errors\": %ld, \"timeouts\": %ld, "
           "\"seconds\": %.3f, \"conn_per_s\": %.1f}\n", ok, errors, timeouts, el, ok / el);
    return 0;
}

/* --- server modes -------------------------------------------------------- */

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind");
    if (listen(fd, 4096) < 0)
        die("listen");
    return fd;
}

struct sargs {
    int port, nports;
    double deadline;
};

static void *accept_loop(void *p) {
    struct sargs *a = p;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int *fds = calloc(a->nports, sizeof *fds);
    for (int i = 0; i < a->nports; i++) { /* SO_REUSEPORT: listeners of its own per thread */
        fds[i] = listen_on(a->port + i);
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    struct epoll_event evs[64];
    while (now() < a->deadline) {
        int n = epoll_wait(ep, evs, 64, 200); /* wakes up to check the clock */
        for (int i = 0; i < n; i++) {
            int c;
            while ((c = accept4(evs[i].data.fd, NULL, NULL, SOCK_CLOEXEC)) >= 0)
                close(c);
        }
    }
    for (int i = 0; i < a->nports; i++)
        close(fds[i]);
    close(ep);
    free(fds);
    return NULL;
}

static int mode_server(int argc, char **argv) {
    if (argc < 5)
        return 2;
    int threads = argc > 5 ? atoi(argv[5]) : 1;
    struct sargs a = {atoi(argv[2]), atoi(argv[3]), now() + atof(argv[4])};
    if (a.nports < 1)
        return 2;
    pthread_t *th = calloc(threads, sizeof *th);
    /* bind every listener before saying ready */
    for (int i = 0; i < threads; i++)
        pthread_create(&th[i], NULL, accept_loop, &a);
    usleep(100000);
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < threads; i++)
        pthread_join(th[i], NULL);
    return 0;
}

static int mode_send(int argc, char **argv) {
    if (argc < 5)
        return 2;
    struct sockaddr_in dst = addr_of(argv[2], argv[3]);
    double secs = atof(argv[4]);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0)
        die("connect");
    static char buf[65536];
    memset(buf, 'x', sizeof buf);
    double t0 = now();
    long long sent = 0;
    while (now() - t0 < secs) {
        ssize_t w = write(fd, buf, sizeof buf);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("write");
        }
        sent += w;
    }
    close(fd);
    printf("{\"mode\": \"send\", \"bytes\": %lld, \"seconds\": %.3f}\n", sent, now() - t0);
    return 0;
}

static int mode_sink(int argc, char **argv) {
    if (argc < 4)
        return 2;
    double deadline = now() + atof(argv[3]);
    int fd = listen_on(atoi(argv[2]));
    struct timeval tv = {0, 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    printf("ready\n");
    fflush(stdout);
    int c = -1;
    while (c < 0 && now() < deadline)
        c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) {
        printf("{\"mode\": \"sink\", \"bytes\": 0, \"seconds\": 0, \"gbit_per_s\": 0}\n");
        return 1;
    }
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    static char buf[1 << 18];
    long long got = 0;
    double first = 0, last = 0;
    while (now() < deadline) {
        ssize_t r = read(c, buf, sizeof buf);
        if (r == 0)
            break;
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            break;
        }
        last = now();
        if (!got)
            first = last;
        got += r;
    }
    double el = last > first ? last - first : 0;
    printf("{\"mode\": \"sink\", \"bytes\": %lld, \"seconds\": %.3f, \"gbit_per_s\": %.3f}\n",
           got, el, el > 0 ? got * 8 / el / 1e9 : 0.0);
    close(c);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    int r = 2;
    if (argc > 1 && !strcmp(argv[1], "connect"))
        r = mode_connect(argc, argv);
    else if (argc > 1 && !strcmp(argv[1], "server"))
        r = mode_server(argc, argv);
    else if (argc > 1 && !strcmp(argv[1], "send"))
        r = mode_send(argc, argv);
    else if (argc > 1 && !strcmp(argv[1], "sink"))
        r = mode_sink(argc, argv);
    if (r == 2)
        fprintf(stderr, "usage: %s connect DST PORT NPORTS SECONDS [INFLIGHT] [THREADS] | "
                        "server PORT NPORTS SECONDS [THREADS] | send DST PORT SECONDS | "
                        "sink PORT SECONDS\n",
                argv[0]);
    return r;
}
