/* overlay._fast: what the Engine passes up to Python, and how it sends: one datagram, runs of datagrams in one
 * GSO send, chunk trains, and a link's packet sealed in place. Included once, by overlay/_fast.c, after
 * _lanes.h. */
#ifndef OVERLAY_FAST_SEND_H
#define OVERLAY_FAST_SEND_H

/* One message to Python: type, then for a datagram its source (family, port, address), for a frame its number
 * (`seq`, big-endian at 4: see Engine_set_flow). */
static void up(Engine *e, int type, const struct sockaddr_storage *from, const uint8_t *data, size_t len,
               uint32_t seq) {
    uint8_t head[UP_HDR] = {0};
    head[0] = (uint8_t)type;
    if (type == UP_FRAME) put32(head + 4, seq);
    if (from && from->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)from;
        head[1] = 4;
        memcpy(head + 2, &s->sin_port, 2);
        memcpy(head + 4, &s->sin_addr, 4);
    } else if (from && from->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const void *)from;
        head[1] = 6;
        memcpy(head + 2, &s->sin6_port, 2);
        memcpy(head + 4, &s->sin6_addr, 16);
    }
    struct iovec iov[2] = {{head, UP_HDR}, {(void *)data, len}};
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
    if (sendmsg(e->up, &m, MSG_DONTWAIT) < 0) e->c_up_dropped++;
    if (type == UP_FRAME) e->c_frames_up++;
    else if (type == UP_DATAGRAM) e->c_datagrams_up++;
}

static void note_now(Engine *e) {
    if (atomic_load(&e->note_pending)) return;
    e->last_note = e->now;
    atomic_store(&e->note_pending, 1);
    up(e, UP_NOTE, NULL, NULL, 0, 0);
}

static void note(Engine *e) {
    if (e->now - e->last_note >= NOTE_NS) note_now(e);
}

/* A route refused a GSO send (send_gso's 1 or 2): what it refused goes whole, for IP to fragment. Where the
 * route's MTU is below the chunk size Python gave the path (1), Python, told at once, asks it again (sync). */
static void refused(Engine *e, int why) {
    e->c_gso_fallback++;
    if (why == 1) {
        e->c_mtu_refused++;
        note_now(e);
    }
}

/* The socket has IP_RECVERR (overlay/transport/underlay.py): an ICMP error from any destination is also
 * reported by the next call on the socket, and a send that reports it sends nothing. Such a send is made once
 * more: the error was another datagram's, and reporting it cleared it. */
static int icmp_reported(int err) {
    return err == ECONNREFUSED || err == EHOSTUNREACH || err == ENETUNREACH || err == EHOSTDOWN;
}

static void send_one(Engine *e, const uint8_t *data, size_t len, const Addr *to) {
    const struct sockaddr *sa = (const struct sockaddr *)&to->sa;
    if (sendto(e->udp, data, len, 0, sa, to->len) >= 0) return;
    if (!(icmp_reported(errno) && sendto(e->udp, data, len, 0, sa, to->len) >= 0)) e->c_send_failed++;
}

static int send_gso(Engine *e, struct iovec *iov, int n, size_t segment, const Addr *to) {
    char control[CMSG_SPACE(sizeof(uint16_t))];
    memset(control, 0, sizeof control);
    struct msghdr m = {.msg_name = (void *)&to->sa, .msg_namelen = to->len, .msg_iov = iov, .msg_iovlen = (size_t)n,
                       .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_UDP_;
    cm->cmsg_type = UDP_SEGMENT_;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    uint16_t seg = (uint16_t)segment;
    memcpy(CMSG_DATA(cm), &seg, sizeof seg);
    if (sendmsg(e->udp, &m, 0) >= 0) return 0;
    if (icmp_reported(errno) && sendmsg(e->udp, &m, 0) >= 0) return 0;
    if (errno == EINVAL || errno == EMSGSIZE) return 1; /* a segment above the route's MTU */
    if (errno == EIO) return 2;                          /* a route UDP GSO cannot take (IPsec transforms it) */
    e->c_send_failed++;
    return -1;
}

static void flush_run(Engine *e) {
    if (!e->run_count) return;
    if (e->run_count == 1) {
        send_one(e, e->run, e->run_len, &e->run_to);
    } else {
        struct iovec iov = {e->run, e->run_len};
        int rc = send_gso(e, &iov, 1, e->run_seg, &e->run_to);
        if (rc > 0) {
            refused(e, rc);
            for (size_t off = 0; off < e->run_len; off += e->run_seg) {
                size_t n = e->run_len - off < e->run_seg ? e->run_len - off : e->run_seg;
                send_one(e, e->run + off, n, &e->run_to);
            }
        }
    }
    e->run_count = 0;
    e->run_len = 0;
}

/* Where the next datagram of `len` bytes to `to` goes: the end of the current run if it can join it (equal
 * sizes; the run's last may be shorter), else a fresh run. Datagrams bigger than a chunk go to e->sealed. */
static uint8_t *slot_for(Engine *e, size_t len, const Addr *to, int express) {
    if (!e->gso || len > (size_t)to->chunk) {
        flush_run(e);
        return e->sealed;
    }
    /* An express datagram in a run of others (or the reverse) would reach the receiver's socket of the run's
     * first: UDP GRO keeps a GSO send whole, and steering reads its first datagram. */
    if (e->run_count && (!addr_same(&e->run_to, to) || len > e->run_seg || e->run_count >= MAX_RUN ||
                         e->run_len + len > MAX_RUN_BYTES || e->run_len % e->run_seg || e->run_express != express))
        flush_run(e);
    if (!e->run_count) {
        e->run_to = *to;
        e->run_seg = len;
        e->run_express = express;
    }
    return e->run + e->run_len;
}

/* The ID of the next chunk train of a datagram sealed in `lane`: the top byte says the lane (0x80 | lane: what the
 * receiver's steering reads, steer_lanes, so it must be the lane of the datagram's own counter), the rest counts
 * from a random start. */
static uint32_t next_message_id(Engine *e, int lane) {
    e->message_id = (e->message_id + 1) & 0xFFFFFFu;
    return (0x80u | (uint32_t)lane) << 24 | e->message_id;
}

/* The datagram just sealed in `lane` at `at` (from slot_for) of `len` bytes leaves (or waits in its run). */
static void emit(Engine *e, uint8_t *at, size_t len, const Addr *to, int lane) {
    if (at != e->sealed) {
        e->run_len += len;
        e->run_count++;
        return;
    }
    if (e->gso && len > (size_t)to->chunk) {
        size_t part = (size_t)to->chunk - CHUNK_HDR;
        int count = (int)((len + part - 1) / part);
        if (count <= MAX_CHUNKS) {
            uint8_t heads[MAX_CHUNKS][CHUNK_HDR];
            struct iovec iov[2 * MAX_CHUNKS];
            uint32_t id = next_message_id(e, lane);
            for (int i = 0; i < count; i++) {
                heads[i][0] = PT_CHUNK;
                put32(heads[i] + 1, id);
                heads[i][5] = (uint8_t)i;
                heads[i][6] = (uint8_t)count;
                size_t off = (size_t)i * part, n = len - off < part ? len - off : part;
                iov[2 * i] = (struct iovec){heads[i], CHUNK_HDR};
                iov[2 * i + 1] = (struct iovec){at + off, n};
            }
            int rc = send_gso(e, iov, 2 * count, (size_t)to->chunk, to);
            if (rc <= 0) return;
            refused(e, rc);
        }
    }
    send_one(e, at, len, to);
}

/* Seal `msg` (pieces) in `lane` for link L and send it: on L's own path, or through its relay's link. Caller holds tab.
 * 0: sent (or waiting in a run); -1: cannot (no usable path), nothing sent. */
static int send_on(Engine *e, FLink *L, int lane, const struct iovec *pieces, int n, size_t msglen) {
    FLink *R = NULL;
    if (!L->direct) {
        R = link_by_peer(e, L->relay);
        if (!R || !R->direct) return -1;
    }
    size_t inner_len = HDR + msglen + TAG;
    /* Through a relay that takes TUNNEL packets only the relay head is sealed for it; else the whole packet. */
    size_t len = !R ? inner_len : R->tunnel_ok ? TUNNEL_OFF + inner_len : HDR + RELAY_HEAD + inner_len + TAG;
    if (len > BUF - 64) return -1;
    const Addr *to = R ? &R->ep : &L->ep;
    int express = e->xudp >= 0 && LANE(lane, R ? R : L) >= EXPRESS_LANE; /* what the next hop's steering reads */
    uint8_t *at = slot_for(e, len, to, express);
    size_t out;
    if (!R) {
        if (keys_seal(L->keys, LANE(lane, L), PT_TRANSPORT, L->remote, pieces, n, at, &out)) return -1;
        L->tx += out;
    } else {
        uint8_t head[RELAY_HEAD];
        head[0] = MSG_RELAY;
        put64(head + 1, L->peer);
        size_t inner;
        if (R->tunnel_ok) {
            if (keys_seal(L->keys, LANE(lane, L), PT_TRANSPORT, L->remote, pieces, n, at + TUNNEL_OFF, &inner)) return -1;
            if (keys_seal_head(R->keys, LANE(lane, R), PT_TUNNEL, R->remote, head, RELAY_HEAD, at + TUNNEL_OFF + inner - TAG,
                               at))
                return -1;
            out = TUNNEL_OFF + inner;
        } else {
            if (keys_seal(L->keys, LANE(lane, L), PT_TRANSPORT, L->remote, pieces, n, e->inner, &inner)) return -1;
            struct iovec outer[2] = {{head, RELAY_HEAD}, {e->inner, inner}};
            if (keys_seal(R->keys, LANE(lane, R), PT_TRANSPORT, R->remote, outer, 2, at, &out)) return -1;
        }
        R->tx += out;
        L->tx += inner;
    }
    L->tx_seen = 1;
    e->c_express_sent += express;
    emit(e, at, out, to, LANE(lane, R ? R : L));
    return 0;
}

#endif
