/* overlay._fast: reading the UDP socket: a batch of reads, GRO's chunk trains (a relayed one passed on whole),
 * and the ICMP errors the socket's error queue holds. Included once, by overlay/_fast.c, after _from_udp.h. */
#ifndef OVERLAY_FAST_UDP_READ_H
#define OVERLAY_FAST_UDP_READ_H

/* The number of chunks if buf (size bytes, GRO's segment seg) is what UDP GRO made of one GSO send of chunks:
 * one message ID, numbered from 0, as many as the first says; else 0. */
static size_t train_count(const uint8_t *buf, size_t size, size_t seg) {
    if (seg <= CHUNK_HDR || seg > MAX_CHUNK || size <= seg || buf[0] != PT_CHUNK || buf[5] != 0) return 0;
    size_t count = (size + seg - 1) / seg;
    if (buf[6] != count || count > MAX_CHUNKS) return 0;
    const uint8_t *last = buf + (count - 1) * seg;
    if (last[0] != PT_CHUNK || memcmp(last + 1, buf + 1, 4) || last[5] != count - 1 || last[6] != count) return 0;
    return count;
}

/* A chunk train of `count` chunks that carries a TUNNEL packet to pass on, where the next hop's path takes
 * chunks of the same size: it leaves as it came, in one GSO send, with only the relay head sealed anew (the
 * first chunk's first TUNNEL_OFF bytes) and the chunks' message ID ours. Joining the train and moving it behind
 * the new head copied a relayed super-frame twice in user space. 1: passed on; 0: not taken, nothing changed
 * (the caller joins it, and on_transport passes it on, delivers it, or sends it up for Python to count). */
static int relay_train(Engine *e, uint8_t *buf, size_t size, size_t seg, size_t count,
                       const struct sockaddr_storage *from) {
    Dgram D = {buf, size - count * CHUNK_HDR, seg, seg - CHUNK_HDR}; /* D.len: the packet the chunks carry */
    size_t len = D.len;
    uint8_t *p = buf + CHUNK_HDR;
    if (!e->gso || p[0] != PT_TUNNEL || D.part < TUNNEL_OFF + 1 || len < TUNNEL_OFF + HDR + TAG + 1) return 0;
    /* The inner packet's tag, which the head is bound to: the packet's last TAG bytes, maybe in two chunks. */
    uint8_t tag[TAG];
    dg_copy(&D, len - TAG, TAG, tag);
    int taken = 0, lane = 0;
    Addr to;
    pthread_mutex_lock(&e->tab);
    Keys *K = NULL;
    FLink *L = link_by_index(e, be32(p + 1), &K);
    if (!L || !L->direct || !addr_eq(&L->ep, from) || p[TUNNEL_OFF] != PT_TRANSPORT) goto out;
    uint8_t *msg = e->plain;
    if (keys_open_part(K, p, TUNNEL_PART, tag, msg, 0) || msg[0] != MSG_RELAY) goto out;
    uint8_t onward[RELAY_HEAD], head[TUNNEL_OFF];
    FLink *T = relay_onward(e, L, msg, onward);
    if (!T || !T->tunnel_ok || (size_t)T->ep.chunk != seg) goto out;
    /* Sealed before the counter is taken, so that a packet not passed on stays unspent for on_transport. */
    if (keys_seal_head(T->keys, LANE(e->lane, T), PT_TUNNEL, T->remote, onward, RELAY_HEAD, tag, head) ||
        !keys_mark(K, be64(p + 5)))
        goto out;
    memcpy(p, head, TUNNEL_OFF);
    if (K == L->next_keys) L->next_used = 1;
    L->rx += len;
    L->rx_seen = 1;
    T->tx += len;
    to = T->ep;
    lane = LANE(e->lane, T);
    taken = 1;
out:
    pthread_mutex_unlock(&e->tab);
    if (!taken) return 0;
    /* Counted before it leaves, as on_transport counts: whoever sees it arrive sees it counted. */
    e->c_relayed++;
    e->c_relayed_trains++;
    e->c_datagrams++;
    note(e);
    uint32_t id = next_message_id(e, lane);
    for (size_t o = 0; o < size; o += seg) put32(buf + o + 1, id);
    flush_run(e); /* what waits for this address leaves first, as slot_for does for a datagram bigger than a chunk */
    struct iovec iov = {buf, size};
    int rc = send_gso(e, &iov, 1, seg, &to);
    if (rc > 0) { /* as emit: whole, for IP to fragment */
        refused(e, rc);
        send_one(e, e->joined, join_train(e, &D), &to);
    }
    return 1;
}

/* ICMP errors queued on the socket (IP_RECVERR): each "unreachable" goes up with the address the failed
 * datagram was sent to (what msg_name holds for the error queue, ip(7)), for Python to check the links there
 * at once (overlay/routing/maintenance.py `unreachable`). Other errors (a path MTU, a TTL) only leave the queue.
 * Any socket of the node's reuseport group may hold one, the express sockets too: the kernel picks the socket for
 * an ICMP error by the group's hash (there is no payload to steer by), and a queue left full keeps epoll saying
 * "readable" (a 60-node lab ran both cores flat while idle when the express sockets' queues were not read). */
static void drain_errors(Engine *e, int fd) {
    for (int i = 0; i < BATCH; i++) {
        struct sockaddr_storage to;
        char control[512];
        uint8_t byte;
        struct iovec iov = {&byte, 1};
        struct msghdr m = {.msg_name = &to, .msg_namelen = sizeof to, .msg_iov = &iov, .msg_iovlen = 1,
                           .msg_control = control, .msg_controllen = sizeof control};
        if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
            int v4 = cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_RECVERR;
            int v6 = cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_RECVERR;
            if (!(v4 || v6) || cm->cmsg_len < CMSG_LEN(sizeof(struct sock_extended_err))) continue;
            struct sock_extended_err ee;
            memcpy(&ee, CMSG_DATA(cm), sizeof ee);
            int icmp = ee.ee_origin == SO_EE_ORIGIN_ICMP || ee.ee_origin == SO_EE_ORIGIN_ICMP6;
            if (icmp && icmp_reported((int)ee.ee_errno) && m.msg_namelen > 0) {
                e->c_unreachable++;
                up(e, UP_UNREACHABLE, &to, NULL, 0, 0);
            }
        }
    }
}

static void drain_udp(Engine *e, int fd) {
    size_t bytes = 0;
    int reported = 0;
    e->now = now_ns();
    for (int i = 0; i < BATCH && bytes < BATCH_BYTES; i++) {
        struct sockaddr_storage from;
        char control[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {e->rbuf, BUF};
        struct msghdr m = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov, .msg_iovlen = 1,
                           .msg_control = control, .msg_controllen = sizeof control};
        ssize_t n = recvmsg(fd, &m, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                /* Only when this call reported an error, or epoll woke us with nothing to read: it says
                 * "readable" (EPOLLERR) for as long as an error is queued, so one reported to a send instead
                 * wakes us again until it is read; a batch of data costs no extra system call. */
                if (reported || !bytes) drain_errors(e, fd);
                break;
            }
            reported = 1; /* an ICMP error reported on this call: its details are in the error queue */
            continue;
        }
        int seg = 0;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm))
            if (cm->cmsg_level == SOL_UDP_ && cm->cmsg_type == UDP_GRO_) memcpy(&seg, CMSG_DATA(cm), sizeof seg);
        size_t size = (size_t)n;
        bytes += size;
        e->c_express_read += fd == e->xudp;
        if (seg > 0 && (size_t)seg < size) {
            size_t count = train_count(e->rbuf, size, (size_t)seg);
            if (count) {
                if (relay_train(e, e->rbuf, size, (size_t)seg, count, &from)) continue;
                Dgram D = {e->rbuf, size - count * CHUNK_HDR, (size_t)seg, (size_t)seg - CHUNK_HDR};
                /* Read where it lies when its first chunk holds every header on_transport reads; else joined. */
                if (D.part < TUNNEL_OFF + HDR) {
                    size_t n = join_train(e, &D);
                    D = (Dgram){e->joined, n, 0, n};
                }
                on_whole(e, &D, &from);
            } else {
                for (size_t o = 0; o < size; o += (size_t)seg)
                    on_datagram(e, e->rbuf + o, size - o < (size_t)seg ? size - o : (size_t)seg, &from);
            }
        } else {
            on_datagram(e, e->rbuf, size, &from);
        }
    }
    e->read_bytes += bytes;
    flush_tap_run(e);
    flush_run(e);
}

#endif
