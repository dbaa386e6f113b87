/* overlay._fast: frames read from the TAP: which member they are for, their flow and routed header, a SocialVPN
 * device's view of the addresses, and the frames held while Python sends what went up before them. Included
 * once, by overlay/_fast.c, after _send.h. */
#ifndef OVERLAY_FAST_FROM_TAP_H
#define OVERLAY_FAST_FROM_TAP_H

static const uint8_t zero_vnet[VNET_LEN];

/* Whether IPv6 address `a` is in our prefix (not its all-zero subnet-router anycast address, RFC 4291 section
 * 2.6.1) and not ours: a member's, as VirtualNic decides. */
static int member6(const Engine *e, const uint8_t *a) {
    int whole = e->prefix6 / 8, bits = e->prefix6 % 8;
    if (memcmp(a, e->ip6, (size_t)whole)) return 0;
    if (bits && ((a[whole] ^ e->ip6[whole]) & (0xFF00 >> bits))) return 0;
    if (!memcmp(a, e->ip6, 16)) return 0;
    uint8_t host = bits ? a[whole] & (0xFF >> bits) : 0;
    for (int i = whole + (bits != 0); i < 16; i++) host |= a[i];
    return host != 0;
}

/* An IP frame to another member of our subnet (IPv4, or IPv6 in our prefix with an address6): its destination
 * and packet; 0 for anything else (ARP, neighbour discovery, multicast, broadcast, our own, off-subnet, a
 * jumbogram: what VirtualNic answers, ignores or refuses, Python's business). */
static int member_frame(Engine *e, const uint8_t *frame, size_t n, Dst *dst, const uint8_t **ip, size_t *total) {
    size_t off = e->vnet ? VNET_LEN : 0;
    if (n < off + ETH_LEN + 20) return 0;
    const uint8_t *eth = frame + off;
    const uint8_t *p = eth + ETH_LEN;
    size_t iplen = n - off - ETH_LEN;
    if (eth[12] == 0x86 && eth[13] == 0xDD) {
        if (!e->has6 || iplen < 40 || p[0] >> 4 != 6) return 0;
        size_t len = 40 + ((size_t)p[4] << 8 | p[5]);
        if (len == 40 || len > iplen) return 0;
        /* Neighbour discovery (RFC 4861 types 133-137) goes up: the node answers solicitations as a proxy. */
        if (p[6] == 58 && p[40] >= 133 && p[40] <= 137) return 0;
        if (!member6(e, p + 24)) return 0; /* multicast (ff00::/8) is in no VPN prefix (fc00::/7, 2000::/3) */
        memcpy(dst->b, p + 24, 16);
        *ip = p, *total = len;
        return 1;
    }
    if (eth[12] != 0x08 || eth[13] != 0x00 || p[0] >> 4 != 4) return 0;
    size_t ihl = (size_t)(p[0] & 15) * 4, len = (size_t)p[2] << 8 | p[3];
    if (ihl < 20 || len < ihl || len > iplen) return 0;
    uint32_t d = be32(p + 16);
    if (d >> 28 == 0xE || d == 0xFFFFFFFFu || d == e->bcast || d == e->net || d == e->ip || (d & e->mask) != e->net)
        return 0;
    memcpy(dst->b, v4_mapped, 12);
    put32(dst->b + 12, d);
    *ip = p, *total = len;
    return 1;
}

enum { FRAME_SENT, FRAME_UP, FRAME_WAIT };

/* RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for the n bytes (n even) `old` replaced by `now` under the checksum
 * at `field`: as overlay/social/translate.py _replace, so the bytes are the same whichever path rewrote them. */
static void csum_replace(uint8_t *field, const uint8_t *old, const uint8_t *now, size_t n) {
    uint32_t s = (uint16_t) ~(field[0] << 8 | field[1]);
    for (size_t i = 0; i < n; i += 2) s += (uint16_t) ~(old[i] << 8 | old[i + 1]) + (uint32_t)(now[i] << 8 | now[i + 1]);
    while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    s = ~s & 0xFFFF;
    field[0] = (uint8_t)(s >> 8), field[1] = (uint8_t)s;
}

/* RFC 792's errors, which quote a datagram whose addresses a SocialVPN rewrite must change too: Python's. */
static int icmp_error(uint8_t type) { return type == 3 || type == 4 || type == 5 || type == 11 || type == 12; }

/* A checksum left to offload (CHECKSUM_PARTIAL) holds the pseudo-header's sum, not its complement: the words
 * `old` replaced by `now` are added to it as they are (Linux's inet_proto_csum_replace4 for CHECKSUM_PARTIAL),
 * so that the receiving kernel's completion gives what translate.py gives the completed packet. */
static void partial_replace(uint8_t *field, const uint8_t *old, const uint8_t *now, size_t n) {
    uint32_t s = (uint32_t)(field[0] << 8 | field[1]);
    for (size_t i = 0; i < n; i += 2) s += (uint16_t) ~(old[i] << 8 | old[i + 1]) + (uint32_t)(now[i] << 8 | now[i + 1]);
    while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    field[0] = (uint8_t)(s >> 8), field[1] = (uint8_t)s;
}

/* Whether virtio header v of the IPv4 packet ip (header length ihl) is offload work a SocialVPN rewrite carries:
 * the transport's own checksum left to complete (TCP's at 16, UDP's at 6, where the kernel puts them) and, if
 * any, TCP segmentation of a TCP packet. Anything else goes to Python (from the TAP) or is not delivered. */
static int social_offload(const uint8_t *v, const uint8_t *ip, size_t ihl) {
    unsigned type = v[1] & ~0x80u;
    if (v[0] != VNET_F_NEEDS_CSUM || (ip[9] != 6 && ip[9] != 17) || ((ip[6] & 0x3F) | ip[7])) return 0;
    if (type != 0 && (type != 1 || ip[9] != 6)) return 0;
    return le16(v + 6) == ETH_LEN + ihl && le16(v + 8) == (ip[9] == 6 ? 16u : 6u);
}

/* SocialVPN's rewrite of a packet our kernel sent a friend device into the device's view (overlay/social/
 * translate.py FriendNat.outbound): source `src`, destination `dst`, the IPv4 header checksum and TCP's or UDP's
 * (whose pseudo-header holds the addresses) updated incrementally, into e->nat_head; the rest of the packet
 * leaves from where it lies. `v`: the frame's virtio header when it carries offload work (social_offload), whose
 * partial checksum is updated as such. Returns the length rewritten, 0 for what Python translates or drops:
 * another source than ours, fragments, ICMP errors (their quote is rewritten too, and checked), other protocols. */
static size_t rewrite_head(Engine *e, const uint8_t *ip, size_t total, uint32_t src, uint32_t dst, const uint8_t *v) {
    size_t ihl = (size_t)(ip[0] & 15) * 4, hl;
    if (be32(ip + 12) != e->ip || ((ip[6] & 0x3F) | ip[7])) return 0;
    switch (ip[9]) {
    case 6: hl = ihl + 18; break;  /* TCP: the checksum at 16 (RFC 793) */
    case 17: hl = ihl + 8; break;  /* UDP (RFC 768) */
    case 1: hl = ihl + 1; break;   /* ICMP: its type; a query's checksum does not cover the addresses */
    default: return 0;
    }
    if (hl > total || (ip[9] == 1 && icmp_error(ip[ihl])) || (v && !social_offload(v, ip, ihl))) return 0;
    uint8_t *h = e->nat_head;
    memcpy(h, ip, hl);
    put32(h + 12, src);
    put32(h + 16, dst);
    csum_replace(h + 10, ip + 12, h + 12, 8);
    if (v) {
        partial_replace(h + ihl + (ip[9] == 6 ? 16 : 6), ip + 12, h + 12, 8);
    } else if (ip[9] == 6) {
        csum_replace(h + ihl + 16, ip + 12, h + 12, 8);
    } else if (ip[9] == 17 && (h[ihl + 6] | h[ihl + 7])) { /* 0: the sender computed none, and it stays 0 */
        csum_replace(h + ihl + 6, ip + 12, h + 12, 8);
        if (!(h[ihl + 6] | h[ihl + 7])) h[ihl + 6] = h[ihl + 7] = 0xFF; /* a computed 0 is sent as all ones */
    }
    return hl;
}

/* Whether an IP packet read from the TAP goes in an express lane (Express lanes, above): EXPRESS_MAX bytes or
 * fewer, not a fragment, and its flow (FlowOf's key: addresses, protocol, ports or a ping's identifier) sent nothing
 * bigger for SPARSE_NS. Every packet bigger notes its flow's time; flows that share a slot (a direct-mapped
 * table) only lose the express lane. 0 without express sockets. */
static int express_packet(Engine *e, const FlowOf *f, size_t total) {
    if (e->xudp < 0 || f->fragment) return 0; /* a fragment: no ports to tell its flow by */
    int64_t *at = &e->big_at[(f->key >> 32) % SPARSE_SLOTS];
    if (total > EXPRESS_MAX) {
        *at = e->now;
        return 0;
    }
    return e->now - *at > SPARSE_NS;
}

/* Under `tab`: send a member frame on its flow, or say it goes up (numbered in *seq) or waits for Python
 * (pending flow; `sent` is Python's Engine_sent, read once per batch). *check: ask Python about the flow. */
static int route_frame(Engine *e, const uint8_t *frame, const Dst *dst, const uint8_t *ip, size_t total,
                       uint32_t sent, uint32_t *seq, int *check) {
    uint32_t slot = slot_of(dst);
    Flow *f = &e->flows[slot];
    FLink *L = NULL;
    int64_t now = e->now;
    int gso = e->vnet && memcmp(frame, zero_vnet, VNET_LEN) != 0;
    FlowOf fl = {.proto = -1};
    if (e->xudp >= 0 || atomic_load_explicit(&e->share->n, memory_order_relaxed) >= 2) flow_of(ip, total, &fl);
    int ask = 0, express = express_packet(e, &fl, total) ? EXPRESS_LANE : 0;
    *check = 0;
    int same = dst_eq(&f->dst, dst);
    if (same && f->asking) {
        if ((int32_t)(sent - f->wait) < 0 && now - f->since < e->stage_ns) return FRAME_WAIT;
        f->asking = 0; /* Python has it and set no flow (or never saw it): up behind it, until Python sets one */
    }
    if (!same || (f->hard && (f->hard < now || !(L = link_by_peer(e, f->peer))))) {
        ask = 1; /* no flow, or one that ended or lost its link */
        goto up;
    }
    if (!f->hard || (gso && !L->big_ok)) goto up;
    if (f->pending) {
        if ((int32_t)(sent - f->wait) < 0) {
            if (now - f->since < e->stage_ns) return FRAME_WAIT;
            *f = (Flow){.dst = *dst}; /* Python did not get that far (a frame it never saw?): up until it sets one */
            goto up;
        }
        f->pending = 0;
    }
    *check = f->expires < now && !f->checking;
    if (*check) f->checking = 1;
    if (f->hlen == 1) {
        /* A frame whose only offload note is a checksum already verified leaves as DATA; offload work goes with
         * its virtio header (DATA_GSO), to a friend the fragment probe found able to take it (big_ok). */
        int work = gso && (frame[0] != VNET_F_DATA_VALID || frame[1] != 0);
        size_t hl = rewrite_head(e, ip, total, f->nat_src, f->nat_dst, work ? frame : NULL);
        if (!hl) goto up; /* Python translates what the Engine does not (fragments, ICMP errors, ...) */
        static const uint8_t data_gso = MSG_DATA_GSO;
        struct iovec pieces[4] = {{work ? (void *)&data_gso : f->header, 1}, {(void *)frame, work ? VNET_LEN : 0},
                                  {e->nat_head, hl}, {(void *)(ip + hl), total - hl}};
        int lane = L->lanes_ok ? lane_for(e, &fl, 1) + express : e->lane;
        if (send_on(e, L, lane, pieces, 4, 1 + (work ? VNET_LEN : 0) + total) == 0) return FRAME_SENT;
        goto numbered;
    }
    uint8_t header[ROUTED_LEN];
    memcpy(header, f->header, ROUTED_LEN);
    header[ROUTED_LEN - 1] = gso ? KIND_DATA_GSO : KIND_DATA;
    struct iovec pieces[3] = {{header, ROUTED_LEN}, {(void *)frame, gso ? VNET_LEN : 0}, {(void *)ip, total}};
    int lane = L->lanes_ok ? lane_for(e, &fl, 1) + express : e->lane;
    if (send_on(e, L, lane, pieces, 3, ROUTED_LEN + (gso ? VNET_LEN : 0) + total) == 0) return FRAME_SENT;
    goto numbered;
up:
    /* A SYN that goes up (no flow yet, or not now) still gets its connection's lane: Python sends it in this
     * Engine's, and once the flow is here the Engine sends the connection's segments in the chosen one, which
     * brings the connection there as a SYN it sent would. Without it, a connection opened while its flow was
     * away (after a route change, or idle past its hard limit) kept the hash's lane for good. */
    lane_for(e, &fl, 0);
numbered:
    /* Numbered under `tab`, so a set_flow either comes first (and this frame goes on the flow) or sees that
     * this frame went up after what Python has sent. */
    *seq = e->up_last[slot] = ++e->up_seq;
    if (ask) {
        *f = (Flow){.dst = *dst, .asking = 1, .wait = *seq, .since = now};
        e->c_flow_asked++;
    }
    return FRAME_UP;
}

static void frame_done(Engine *e, int r, const Dst *dst, const uint8_t *frame, size_t n, uint32_t seq, int check) {
    if (check) { /* the address as Python writes it: 4 bytes for IPv4, 16 for IPv6 */
        if (dst_is_v4(dst)) up(e, UP_FLOW, NULL, dst->b + 12, 4, 0);
        else up(e, UP_FLOW, NULL, dst->b, 16, 0);
    }
    if (r == FRAME_SENT) {
        e->c_frames++;
        note(e);
    } else {
        up(e, UP_FRAME, NULL, frame, n, seq);
    }
}

static void stage(Engine *e, const uint8_t *frame, size_t n, uint32_t slot) {
    if (e->stage_n == STAGE_MAX || e->stage_len + n > STAGE_BYTES) {
        e->c_stage_dropped++; /* a full queue drops, as a router's does; going up would overtake the held */
        return;
    }
    memcpy(e->stage_buf + e->stage_len, frame, n);
    e->stage[e->stage_n++] = (Staged){(uint32_t)e->stage_len, (uint32_t)n, slot};
    e->stage_len += n;
    e->held_in[slot]++;
    e->c_staged++;
    atomic_store(&e->staging, 1);
}

static void on_frame(Engine *e, const uint8_t *frame, size_t n) {
    Dst dst;
    uint32_t seq = 0;
    const uint8_t *ip;
    size_t total;
    int check;
    if (!member_frame(e, frame, n, &dst, &ip, &total)) {
        up(e, UP_FRAME, NULL, frame, n, ++e->up_seq);
        return;
    }
    uint32_t slot = slot_of(&dst);
    if (e->held_in[slot]) { /* behind what is held for its address: released in order */
        stage(e, frame, n, slot);
        return;
    }
    pthread_mutex_lock(&e->tab);
    int r = route_frame(e, frame, &dst, ip, total, atomic_load(&e->py_sent), &seq, &check);
    pthread_mutex_unlock(&e->tab);
    if (r == FRAME_WAIT) stage(e, frame, n, slot);
    else frame_done(e, r, &dst, frame, n, seq, check);
}

/* The held frames, in order, once more: those whose flow Python has caught up with leave on it, those whose
 * flow is gone go up, the others stay held. One pass under `tab` and one reading of Python's progress, so that
 * every frame of one flow meets the same state. */
static void release_staged(Engine *e) {
    uint32_t sent = atomic_load(&e->py_sent), seq = 0;
    Dst dst;
    const uint8_t *ip;
    size_t total, w = 0;
    int keep = 0, check;
    e->now = now_ns();
    /* held_in counts again what stays: a frame behind one that stays for its slot stays too, whatever its own
     * flow says (two addresses of one slot: the second's ask must not let the first's later frames pass). */
    for (int i = 0; i < e->stage_n; i++) e->held_in[e->stage[i].slot] = 0;
    pthread_mutex_lock(&e->tab);
    for (int i = 0; i < e->stage_n; i++) {
        Staged st = e->stage[i];
        uint8_t *frame = e->stage_buf + st.off;
        member_frame(e, frame, st.len, &dst, &ip, &total); /* held frames are member frames */
        int r = e->held_in[st.slot] ? FRAME_WAIT : route_frame(e, frame, &dst, ip, total, sent, &seq, &check);
        if (r == FRAME_WAIT) {
            memmove(e->stage_buf + w, frame, st.len);
            e->stage[keep++] = (Staged){(uint32_t)w, st.len, st.slot};
            e->held_in[st.slot]++;
            w += st.len;
        } else {
            frame_done(e, r, &dst, frame, st.len, seq, check);
        }
    }
    pthread_mutex_unlock(&e->tab);
    e->stage_n = keep;
    e->stage_len = w;
    atomic_store(&e->staging, keep > 0);
    flush_run(e);
}

static void drain_tap(Engine *e) {
    size_t bytes = 0;
    e->now = now_ns();
    for (int i = 0; i < BATCH && bytes < BATCH_BYTES; i++) {
        ssize_t n = read(e->tap, e->rbuf, BUF);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) e->c_tap_failed++;
            break;
        }
        bytes += (size_t)n;
        on_frame(e, e->rbuf, (size_t)n);
    }
    e->read_bytes += bytes;
    flush_run(e);
}

#endif
