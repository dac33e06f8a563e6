/*
 * A sockvisor worker in C: HTTP hello on connections from the channel at fd 3.
 * Build: cc -O2 -o worker examples/worker.c      Protocol: docs/protocol.md
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

static void serve(int fd, const char *reply, size_t len) {
    char req[4096];
    (void)!read(fd, req, sizeof req); /* the request (a demo: one read) */
    for (size_t off = 0; off < len;) {
        ssize_t w = send(fd, reply + off, len - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break; /* the client went away */
        off += (size_t)w;
    }
    close(fd);
}

int main(void) {
    const char *lp = getenv("LISTEN_PID"), *lf = getenv("LISTEN_FDS");
    if (!lp || !lf || atol(lp) != (long)getpid() || atoi(lf) < 1) {
        fprintf(stderr, "worker.c: no LISTEN_FDS for this process\n");
        return 1;
    }
    int chan = 3, type = 0;
    socklen_t tl = sizeof type;
    if (getsockopt(chan, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 || type != SOCK_SEQPACKET) {
        fprintf(stderr, "worker.c: fd 3 is not a sockvisor channel\n");
        return 1;
    }
    const char *id = getenv("SOCKVISOR_WORKER_ID");
    char body[128], reply[256];
    int blen = snprintf(body, sizeof body, "hello from c worker %s\n", id ? id : "-");
    int rlen = snprintf(reply, sizeof reply,
                        "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
                        blen, body);

    sigset_t term; /* SIGTERM arrives as data on a signalfd, polled with the channel */
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigprocmask(SIG_BLOCK, &term, NULL);
    int sfd = signalfd(-1, &term, SFD_CLOEXEC);
    int stopping = 0;

    for (;;) {
        if (!stopping) {
            struct pollfd p[2] = {{.fd = chan, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
            if (poll(p, 2, -1) < 0) continue;
            if (p[1].revents) stopping = 1; /* SIGTERM: serve what is queued, then exit */
        }
        unsigned char msg[8];
        union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } u;
        struct iovec iov = {.iov_base = msg, .iov_len = sizeof msg};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
                           .msg_controllen = sizeof u.b};
        ssize_t r = recvmsg(chan, &m, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (stopping && errno == EAGAIN) break;
            continue;
        }
        if (r < 0) { perror("worker.c: recvmsg"); return 1; }
        int fd = -1;
        for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h))
            if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS &&
                h->cmsg_len >= CMSG_LEN(sizeof(int)))
                memcpy(&fd, CMSG_DATA(h), sizeof fd);
        if (r == 0 && fd < 0) break; /* end of file: sockvisor is gone */
        if (r != 8 || msg[0] != 1 || msg[1] != 1 || fd < 0 || (m.msg_flags & MSG_CTRUNC)) {
            if (fd >= 0) close(fd); /* not a connection message we understand: skip it */
            continue;
        }
        serve(fd, reply, (size_t)rlen);
        if (msg[2] & 1) { /* sockvisor asked for a close report (best effort) */
            unsigned char closed[8] = {1, 2, 0, 0, 1, 0, 0, 0};
            send(chan, closed, sizeof closed, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
    }
    return 0;
}
