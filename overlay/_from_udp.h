/* overlay._fast: a datagram from the UDP socket, contiguous or a chunk train read where it lies: opened and
 * delivered, passed on to the next hop, rebuilt from chunks that came one by one, or passed up to Python.
 * Included once, by overlay/_fast.c, after _to_tap.h. */
#ifndef OVERLAY_FAST_FROM_UDP_H
#define OVERLAY_FAST_FROM_UDP_H

/* The link a relay head from L (MSG_RELAY, the peer's ID) names, if we may pass packets on to it (a direct link,
 * not back to L), with the head it gets from us in `onward` (MSG_RELAYED, L's peer); else NULL. */
static FLink *relay_onward(Engine *e, FLink *L, const uint8_t *head, uint8_t onward[RELAY_HEAD]) {
    FLink *T = link_by_peer(e, be64(head + 1));
    if (!T || !T->direct || T == L) return NULL;
    onward[0] = MSG_RELAYED;
    put64(onward + 1, L->peer);
    return T;
}

/* A datagram as the socket gave it: contiguous (seg 0), or a chunk train that UDP GRO handed over in one read
 * (train_count), the datagram being its chunks' payloads (part bytes each, the last maybe fewer) after their
 * CHUNK_HDR-byte headers. The data path reads a train where it lies: the cipher takes its pieces and writes the
 * plaintext, where joining the chunks first had copied every super-frame once more (under one TCP stream, the
 * receiving Engine spent 10 % of its samples joining and 12 % opening, 2026-12-06: docs/datapath.md). */
typedef struct {
    uint8_t *buf; /* contiguous: the datagram; a train: its first chunk's header */
    size_t len;   /* the datagram's length */
    size_t seg;   /* a train: GRO's segment size; 0: contiguous */
    size_t part;  /* the datagram's bytes each chunk carries (seg - CHUNK_HDR); contiguous: len */
} Dgram;

/* The datagram's first byte: D->part bytes from here are contiguous (its headers are read there). */
static inline uint8_t *dg_first(const Dgram *D) { return D->seg ? D->buf + CHUNK_HDR : D->buf; }

/* Bytes [from, to) of the datagram as pieces in place (at most MAX_CHUNKS): their count. */
static int dg_pieces(const Dgram *D, size_t from, size_t to, struct iovec *iov) {
    int n = 0;
    while (from < to) {
        size_t o = from % D->part, take = D->part - o;
        if (take > to - from) take = to - from;
        iov[n++] = (struct iovec){dg_first(D) + from / D->part * D->seg + o, take};
        from += take;
    }
    return n;
}

/* Copy n bytes from `from` on into out. */
static void dg_copy(const Dgram *D, size_t from, size_t n, uint8_t *out) {
    struct iovec iov[MAX_CHUNKS + 1];
    int k = dg_pieces(D, from, from + n, iov);
    for (int i = 0; i < k; i++) {
        memcpy(out, iov[i].iov_base, iov[i].iov_len);
        out += iov[i].iov_len;
    }
}

/* The transport packet at bytes [off, D->len) of D (its header in D's first part; its tag `tag`, the datagram's
 * last TAG bytes), opened into out without marking: keys_open_iov's results. */
static int dg_open(Keys *K, const Dgram *D, size_t off, const uint8_t *tag, uint8_t *out) {
    struct iovec iov[MAX_CHUNKS + 1];
    int n = dg_pieces(D, off + HDR, D->len - TAG, iov);
    return keys_open_iov(K, dg_first(D) + off, iov, n, tag, NULL, out, 0);
}

/* A transport or TUNNEL packet: 1 handled here, 0 pass it up untouched. */
static int on_transport(Engine *e, const Dgram *D, const struct sockaddr_storage *from) {
    const uint8_t *pkt = dg_first(D);
    size_t len = D->len;
    int tunnel = pkt[0] == PT_TUNNEL;
    if (len < (tunnel ? TUNNEL_OFF + HDR + TAG + 1 : HDR + TAG + 1)) return 0;
    /* The datagram's last TAG bytes: the tag of the (inner) transport packet, which a TUNNEL head is bound to. */
    uint8_t tail_copy[TAG];
    const uint8_t *tail = pkt + len - TAG;
    if (D->seg) {
        dg_copy(D, len - TAG, TAG, tail_copy);
        tail = tail_copy;
    }
    Delivery d;
    int handled = 0, relay = 0;
    Addr relay_to;
    int relay_lane = 0;
    size_t relay_len = 0;
    uint8_t *relay_at = NULL;
    pthread_mutex_lock(&e->tab);
    Keys *K = NULL, *MK = NULL;
    FLink *M_used = NULL;
    FLink *L = link_by_index(e, be32(pkt + 1), &K);
    /* Only from where the link's path points: a packet from elsewhere may move the link (Python decides). */
    if (!L || !L->direct || !addr_eq(&L->ep, from)) goto out;
    uint8_t *msg = e->plain;
    uint64_t c = be64(pkt + 5);
    /* The relay head, and the link packet it carries (`in`, inlen bytes: bytes inoff on of inD, its tag inTag):
     * inside the plaintext of a transport packet, or the opened head of a TUNNEL packet and the packet after it,
     * untouched. */
    const uint8_t *head = msg, *in, *inTag;
    const Dgram *inD;
    Dgram plainD;
    size_t mlen, inlen, inoff;
    if (tunnel) {
        mlen = RELAY_HEAD;
        inD = D, inoff = TUNNEL_OFF, inlen = len - TUNNEL_OFF, inTag = tail;
        in = pkt + TUNNEL_OFF;
        /* What decode_transport_header and LinkManager refuse is Python's to count, not ours to pass on. */
        if (in[0] != PT_TRANSPORT) goto out;
        if (keys_open_part(K, pkt, TUNNEL_PART, tail, msg, 0)) goto out; /* Python counts these too */
        if (msg[0] != MSG_RELAY && msg[0] != MSG_RELAYED) goto out;
    } else {
        if (dg_open(K, D, 0, tail, msg)) goto out; /* Python counts replays and forgeries */
        mlen = len - HDR - TAG;
        inlen = mlen > RELAY_HEAD ? mlen - RELAY_HEAD : 0;
        plainD = (Dgram){msg, mlen, 0, mlen};
        inD = &plainD, inoff = RELAY_HEAD, in = msg + RELAY_HEAD, inTag = inlen >= TAG ? in + inlen - TAG : NULL;
    }
    if (tunnel && e->social) goto out; /* friends relay nothing: Python drops it */
    if (!tunnel && (e->social ? msg[0] == MSG_DATA || msg[0] == MSG_DATA_GSO : msg[0] == MSG_ROUTED)) {
        if (data_for_us(e, L, msg, mlen, &d) || !keys_mark(K, c)) goto out;
        L->rx += len;
        L->rx_seen = 1;
        handled = 1;
    } else if (e->social) {
        goto out; /* a friend device's RELAY or anything else: Python's to drop and count */
    } else if (head[0] == MSG_RELAY && mlen >= RELAY_HEAD && inlen > HDR + TAG) {
        uint8_t onward[RELAY_HEAD];
        FLink *T = relay_onward(e, L, head, onward);
        if (!T) goto out;
        /* A transport packet onward as a TUNNEL packet if the next hop takes them; anything else whole. */
        int onward_tunnel = T->tunnel_ok && in[0] == PT_TRANSPORT;
        size_t out_len = onward_tunnel ? TUNNEL_OFF + inlen : HDR + RELAY_HEAD + inlen + TAG;
        /* What came in an express lane goes on in ours (Express lanes). */
        int onward_lane = LANE(e->lane + (pkt[5] >= EXPRESS_LANE && e->xudp >= 0 ? EXPRESS_LANE : 0), T);
        relay_at = slot_for(e, out_len, &T->ep, e->xudp >= 0 && onward_lane >= EXPRESS_LANE);
        if (!keys_mark(K, c)) goto out;
        if (onward_tunnel) {
            dg_copy(inD, inoff, inlen, relay_at + TUNNEL_OFF);
            if (keys_seal_head(T->keys, onward_lane, PT_TUNNEL, T->remote, onward, RELAY_HEAD, inTag, relay_at))
                goto out;
            relay_len = out_len;
        } else {
            struct iovec pieces[MAX_CHUNKS + 2] = {{onward, RELAY_HEAD}};
            int n = 1 + dg_pieces(inD, inoff, inoff + inlen, pieces + 1);
            if (keys_seal(T->keys, onward_lane, PT_TRANSPORT, T->remote, pieces, n, relay_at, &relay_len)) goto out;
        }
        L->rx += len;
        L->rx_seen = 1;
        T->tx += relay_len;
        relay_to = T->ep;
        relay_lane = onward_lane;
        relay = handled = 1;
    } else if (head[0] == MSG_RELAYED && mlen >= RELAY_HEAD && inlen > HDR + TAG && in[0] == PT_TRANSPORT) {
        /* Out of a tunnel through L: the inner packet is a session of ours with the tunnel's far end. */
        FLink *M = link_by_index(e, be32(in + 1), &MK);
        if (!M || M == L || M->peer != be64(head + 1)) goto out;
        uint8_t *inner = e->plain2;
        uint64_t ic = be64(in + 5);
        if (dg_open(MK, inD, inoff, inTag, inner)) goto out;
        if (data_for_us(e, M, inner, inlen - HDR - TAG, &d)) goto out;
        if (!keys_mark(K, c)) goto out;
        if (!keys_mark(MK, ic)) goto out; /* the outer is spent; Python would drop this replay too */
        L->rx += len;
        L->rx_seen = 1;
        M->rx += inlen;
        M->rx_seen = 1;
        M_used = M;
        handled = 1;
    }
out:
    if (handled) {
        if (K == L->next_keys) L->next_used = 1;
        if (M_used && M_used->next_keys == MK) M_used->next_used = 1;
    }
    pthread_mutex_unlock(&e->tab);
    if (handled) {
        e->c_datagrams++;
        note(e);
    }
    if (relay) {
        e->c_relayed++;
        e->c_express_sent += e->xudp >= 0 && relay_lane >= EXPRESS_LANE;
        emit(e, relay_at, relay_len, &relay_to, relay_lane);
    } else if (handled) {
        to_tap(e, &d);
    }
    return handled;
}

/* A train joined into e->joined (Python, and paths that need the datagram in one piece, read it so): its length. */
static size_t join_train(Engine *e, const Dgram *D) {
    dg_copy(D, 0, D->len, e->joined);
    return D->len;
}

/* A whole datagram, contiguous or a train: the Engine's to handle, or Python's. */
static void on_whole(Engine *e, const Dgram *D, const struct sockaddr_storage *from) {
    uint8_t type = D->len ? dg_first(D)[0] : 0;
    if ((type == PT_TRANSPORT || type == PT_TUNNEL) && on_transport(e, D, from)) return;
    if (D->seg) up(e, UP_DATAGRAM, from, e->joined, join_train(e, D), 0);
    else up(e, UP_DATAGRAM, from, D->buf, D->len, 0);
}

/* A chunk read on its own: where a path's GRO did not coalesce a message's chunks (a NIC or kernel without UDP
 * GRO, a NAPI poll that ended inside a message, a network that re-cut the GSO send), each arrives alone. The
 * Engine rebuilds the message as overlay/transport/chunks.py's Reassembly does (the same checks, the same
 * bound on time) and handles it; passed up one by one, every chunk of a stream went through Python: in two
 * namespaces with the sender's UDP segmentation done in software and GRO on the receiver's veth, one TCP stream
 * carried 1,559 Mbit/s, its packets reordered, and 3,684 with the messages rebuilt here (7,625 with the chunks
 * coalesced; 2026-12-06). Its state
 * is bounded: PENDING_SLOTS messages (a new one takes a free slot, else a stale one, else the oldest), each at
 * most MAX_CHUNKS parts of PART_MAX bytes. A forged or lost chunk costs its message, as a forged IP fragment
 * would: the message is a link packet that authenticates itself. Returns 0 when d is not a chunk at all. */
static int pending_chunk(Engine *e, const uint8_t *d, size_t len, const struct sockaddr_storage *from) {
    if (len <= CHUNK_HDR || len > MAX_CHUNK || d[0] != PT_CHUNK) return 0;
    uint32_t id = be32(d + 1);
    int index = d[5], count = d[6];
    if (count < 2 || count > MAX_CHUNKS || index >= count) return 0; /* Python counts it malformed */
    Pending *slot = NULL, *free_slot = NULL, *oldest = NULL;
    for (int i = 0; i < PENDING_SLOTS; i++) {
        Pending *p = &e->pending[i];
        if (!p->count) {
            if (!free_slot) free_slot = p;
            continue;
        }
        if (p->id == id && sockaddr_eq(&p->from, from)) slot = p;
        else if (e->now - p->began > PENDING_NS && !free_slot) free_slot = p, p->count = 0, e->c_chunks_dropped++;
        if (p->count && (!oldest || p->began < oldest->began)) oldest = p;
    }
    if (slot && (slot->count != count || e->now - slot->began > PENDING_NS)) {
        slot->count = 0; /* a message ID reused after a loss, or chunks that disagree */
        e->c_chunks_dropped++;
        free_slot = slot, slot = NULL;
    }
    if (!slot) {
        if (!free_slot) {
            free_slot = oldest;
            e->c_chunks_dropped++;
        }
        slot = free_slot;
        if (!slot->buf && !(slot->buf = malloc((size_t)MAX_CHUNKS * PART_MAX))) {
            slot->count = 0;
            e->c_chunks_dropped++;
            return 1;
        }
        slot->from = *from;
        slot->id = id;
        slot->count = count;
        slot->have = 0;
        slot->began = e->now;
    }
    size_t n = len - CHUNK_HDR;
    memcpy(slot->buf + (size_t)index * PART_MAX, d + CHUNK_HDR, n);
    slot->len[index] = (uint16_t)n;
    slot->have |= 1ULL << index;
    if (__builtin_popcountll(slot->have) < count) return 1;
    /* Complete: the parts back to back (already so when each but the last filled PART_MAX: a 1,500-byte path). */
    size_t total = 0;
    for (int i = 0; i < count; i++) {
        if (total != (size_t)i * PART_MAX) memmove(slot->buf + total, slot->buf + (size_t)i * PART_MAX, slot->len[i]);
        total += slot->len[i];
    }
    slot->count = 0;
    if (total > MAX_DATAGRAM) {
        e->c_chunks_dropped++;
        return 1;
    }
    e->c_chunks_rebuilt++;
    Dgram W = {slot->buf, total, 0, total};
    on_whole(e, &W, from);
    return 1;
}

static void on_datagram(Engine *e, uint8_t *d, size_t len, const struct sockaddr_storage *from) {
    if (len && d[0] == PT_CHUNK && pending_chunk(e, d, len, from)) return;
    Dgram D = {d, len, 0, len};
    on_whole(e, &D, from);
}

#endif
