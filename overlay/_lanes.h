/* overlay._fast: the lanes. The receiver's steering of each datagram to its lane's socket, and the sender's
 * choice of a lane for what it reads from the TAP: a TCP connection's, a UDP flow's or a ping's, the least busy
 * when it began (LaneShare, _engine.h). Included once, by overlay/_fast.c, after _engine.h. */
#ifndef OVERLAY_FAST_LANES_H
#define OVERLAY_FAST_LANES_H

/* Steering at the receiver: the node's UDP sockets, one per Engine, share its port (SO_REUSEPORT), and this
 * program, run by the kernel on each datagram's UDP payload, picks the socket of the datagram's lane: the top byte
 * of a link packet's counter (transport, SEALED, TUNNEL: byte 5), or of a chunk's message ID (byte 1, whose top
 * bit every Engine sets). Anything else (handshakes, STUN, TURN, what is too short to hold the byte) goes to the
 * first socket, which Python's reads also come through. A lane beyond the sockets there are wraps around. */
#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif
static PyObject *steer_lanes(PyObject *module, PyObject *args) {
    int fd, n, express = 0;
    if (!PyArg_ParseTuple(args, "ii|p", &fd, &n, &express)) return NULL;
    if (n < 1 || n > (express ? EXPRESS_LANE : LANES))
        return PyErr_Format(PyExc_ValueError, "lanes are 1 to %d", express ? EXPRESS_LANE : LANES);
    /* With express sockets (the group's n + k: lane k's), a datagram of lane EXPRESS_LANE + k goes to lane k's;
     * without, no lane byte reaches the test at 8 (it is below 0x100), and every lane wraps around the n. */
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 0),                   /* 0: the packet type */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PT_CHUNK, 4, 0),     /* 1: a chunk: 6 */
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, PT_TRANSPORT, 0, 12), /* 2: below transport: 15 */
        BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, PT_TUNNEL, 11, 0),   /* 3: above TUNNEL: 15 */
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 5),                   /* 4: the counter's top byte */
        BPF_JUMP(BPF_JMP | BPF_JA, 2, 0, 0),                     /* 5: 8 */
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 1),                   /* 6: the message ID's top byte */
        BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0x7F),               /* 7 */
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, express ? EXPRESS_LANE : 0x100, 2, 0), /* 8: an express lane: 11 */
        BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, (uint32_t)n),        /* 9 */
        BPF_STMT(BPF_RET | BPF_A, 0),                            /* 10 */
        BPF_STMT(BPF_ALU | BPF_SUB | BPF_K, EXPRESS_LANE),       /* 11 */
        BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, (uint32_t)n),        /* 12 */
        BPF_STMT(BPF_ALU | BPF_ADD | BPF_K, (uint32_t)n),        /* 13 */
        BPF_STMT(BPF_RET | BPF_A, 0),                            /* 14 */
        BPF_STMT(BPF_RET | BPF_K, 0),                            /* 15 */
    };
    struct sock_fprog prog = {.len = sizeof code / sizeof *code, .filter = code};
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof prog) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* The lane a packet sealed in `lane` is sealed in for link L's peer: lane 0 for a peer without lanes. */
#define LANE(lane, L) ((L)->lanes_ok ? (lane) : 0)

/* The lane for a new TCP connection: the least busy one, in turn among those about as idle (within a quarter,
 * or under LOAD_IDLE: a choice that chases noise would spread nothing). */
static int pick_lane(Engine *e) {
    LaneShare *s = e->share;
    int n = atomic_load(&s->n);
    if (n < 2) return e->lane;
    uint64_t load[LANES], least = UINT64_MAX;
    for (int k = 0; k < n; k++) {
        load[k] = e->now - atomic_load_explicit(&s->active_at[k], memory_order_relaxed) > QUIET_NS
                      ? 0
                      : atomic_load_explicit(&s->load[k], memory_order_relaxed);
        if (load[k] < least) least = load[k];
    }
    int among[LANES], c = 0;
    for (int k = 0; k < n; k++)
        if (load[k] <= least + least / 4 + LOAD_IDLE) among[c++] = k;
    return among[atomic_fetch_add(&s->next, 1) % (unsigned)c];
}

/* This lane's load, once a window (the thread, after a batch that carried what took the counters from
 * `before` to `total`). Only this lane's thread writes its slots: a plain load and store, no locked exchange. */
static void count_load(Engine *e, int64_t t, uint64_t before, uint64_t total) {
    LaneShare *s = e->share;
    int64_t last = atomic_load_explicit(&s->active_at[e->lane], memory_order_relaxed);
    atomic_store_explicit(&s->active_at[e->lane], t, memory_order_relaxed);
    if (t - last > QUIET_NS) {
        atomic_store_explicit(&s->load[e->lane], 0, memory_order_relaxed);
        e->load_start = t;
        e->load_base = before;
    } else if (t - e->load_start >= LOAD_NS) {
        uint64_t per = (total - e->load_base) * (uint64_t)LOAD_NS / (uint64_t)(t - e->load_start);
        atomic_store_explicit(&s->load[e->lane], per, memory_order_relaxed);
        e->load_start = t;
        e->load_base = total;
    }
}

/* A flow's 64-bit key from its addresses and what tells it from others between them (ports, a ping's identifier):
 * splitmix64's finaliser, so the slot and the check come from one key. */
static uint64_t flow_key(uint64_t addrs, uint64_t what) {
    uint64_t key = addrs ^ what * 0x9E3779B97F4A7C15ull;
    key = (key ^ key >> 30) * 0xBF58476D1CE4E5B9ull;
    key = (key ^ key >> 27) * 0x94D049BB133111EBull;
    return key ^ key >> 31;
}

/* The lane of a UDP flow or ping this node sends (LaneShare, `flow`): the one picked at its first packet while
 * it stays live, its stamp refreshed once a stamp; a flow quiet for longer (nothing of it in flight) picks again,
 * and a new flow takes the slot when it is free or its flow went quiet. */
static int flow_lane(Engine *e, uint64_t key, int sending) {
    LaneShare *s = e->share;
    atomic_uint_fast64_t *slot = &s->flow[key >> (64 - CONN_BITS)];
    uint64_t stamp = FLOW_STAMP(e->now), v = atomic_load_explicit(slot, memory_order_relaxed);
    key &= ~0xFFFFFFull;
    int lane, live = (v & 0x80) && (((stamp >> 8) - (v >> 8 & 0xFFFF)) & 0xFFFF) <= FLOW_LIVE;
    if (live && !((v ^ key) >> 24)) {
        lane = (int)(v & 0x7F);
        if ((v & 0xFFFF00) != stamp)
            atomic_store_explicit(slot, key | stamp | 0x80 | (uint64_t)lane, memory_order_relaxed);
        e->c_flow_moved += sending && lane != e->lane;
        return lane;
    }
    if (live) return e->lane; /* another flow's */
    lane = pick_lane(e);
    if (!atomic_compare_exchange_strong(slot, &v, key | stamp | 0x80 | (uint64_t)lane)) {
        /* Another Engine took the slot meanwhile: for this flow (its first packets read by two queues), or not. */
        return (v & 0x80) && !((v ^ key) >> 24) ? (int)(v & 0x7F) : e->lane;
    }
    e->c_flow_started += sending && lane != e->lane;
    return lane;
}

/* What the lanes (lane_for) and the express lanes (express_packet) read of an IP packet from the TAP, read once
 * per packet: its transport protocol (-1: a header too short to say), where its transport header starts and how
 * many bytes follow it, whether it is a fragment (IPv4; an IPv6 fragment header is a protocol of its own) and
 * one but the first, whether it is an echo request, and its flow's key: its addresses, protocol and what tells
 * it from others between them (TCP's, UDP's and SCTP's ports, an echo request's identifier) through flow_key. */
typedef struct {
    int proto, fragment, later_fragment, echo;
    const uint8_t *l4;
    size_t room;
    uint64_t key;
} FlowOf;

static void flow_of(const uint8_t *ip, size_t total, FlowOf *f) {
    uint64_t addrs;
    size_t hl;
    *f = (FlowOf){.proto = -1, .l4 = ip};
    if (ip[0] >> 4 == 6) { /* what is right after the fixed header; behind extension headers it counts as theirs */
        if (total < 40) return;
        f->proto = ip[6];
        hl = 40;
        uint64_t dst = be64(ip + 24) ^ be64(ip + 32);
        addrs = be64(ip + 8) ^ be64(ip + 16) ^ (dst << 32 | dst >> 32);
    } else {
        hl = (size_t)(ip[0] & 15) * 4;
        if (total < hl) return;
        f->proto = ip[9];
        f->fragment = ((ip[6] & 0x3F) | ip[7]) != 0;
        f->later_fragment = ((ip[6] & 0x1F) | ip[7]) != 0; /* no ports */
        addrs = (uint64_t)be32(ip + 12) << 32 | be32(ip + 16);
    }
    f->l4 = ip + hl;
    f->room = total - hl;
    uint64_t what = 0;
    if (!f->later_fragment) {
        f->echo = f->room >= 8 && ((f->proto == 1 && f->l4[0] == 8) || (f->proto == 58 && f->l4[0] == 128));
        if ((f->proto == 6 || f->proto == 17 || f->proto == 132) && f->room >= 4) what = be32(f->l4);
        else if (f->echo) what = (uint64_t)be16(f->l4 + 4) << 32 | 1; /* its identifier: one flow per ping */
    }
    f->key = flow_key(addrs, (uint64_t)f->proto << 48 ^ what);
}

/* The lane for an IP packet read from the TAP, to a peer that takes lanes: a TCP segment of a connection this
 * node opened goes in the connection's lane, a SYN (without ACK) picks one; a UDP datagram or an echo request in
 * its flow's lane (flow_lane); anything else goes in the Engine's. `sending`: the Engine sends it (counted in
 * status when it goes in another lane than the Engine's), else it goes up, and only a pick counts. */
static int lane_for(Engine *e, const FlowOf *f, int sending) {
    LaneShare *s = e->share;
    if (atomic_load(&s->n) < 2 || f->later_fragment) return e->lane;
    if ((f->proto == 17 && f->room >= 8) || f->echo) return flow_lane(e, f->key, sending);
    if (f->proto != 6 || f->room < 14) return e->lane;
    const uint8_t *tcp = f->l4;
    uint64_t key = f->key | 0x100;
    atomic_uint_fast64_t *slot = &s->conn[key >> (64 - CONN_BITS)];
    int lane;
    if ((tcp[13] & 0x12) == 0x02) {
        lane = pick_lane(e);
        atomic_store(slot, (key & ~0xFFull) | (uint64_t)lane);
        e->c_syn_moved += sending && lane != e->lane;
        return lane;
    }
    uint64_t v = atomic_load(slot);
    if ((v ^ key) >> 8 || (lane = (int)(v & 0xFF)) == e->lane) return e->lane;
    e->c_conn_moved += sending;
    return lane;
}

#endif
