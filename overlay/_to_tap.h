/* overlay._fast: what a link packet delivers to this node, checked as the Python path checks it, and how it
 * is written to the TAP: alone, or with the UDP datagrams of its flow as one USO super-frame. Included once, by
 * overlay/_fast.c, after _from_tap.h. */
#ifndef OVERLAY_FAST_TO_TAP_H
#define OVERLAY_FAST_TO_TAP_H

/* A virtio_net_hdr from a peer, checked as overlay/tap/frames.py parse_vnet_header does: TCP segmentation and
 * checksum offload only, every offset inside the frame. */
static int vnet_ok(const uint8_t *h, size_t frame_len) {
    unsigned flags = h[0], type = h[1] & ~0x80u, hdr_len = h[2] | h[3] << 8, gso_size = h[4] | h[5] << 8;
    unsigned start = h[6] | h[7] << 8, offset = h[8] | h[9] << 8;
    if (flags & ~3u || (type != 0 && type != 1 && type != 4)) return 0;
    if (type != 0 && (gso_size < 48 || !(flags & 1))) return 0;
    if (flags & 1 && !(ETH_LEN <= start && (size_t)start + offset + 2 <= frame_len)) return 0;
    return hdr_len <= frame_len;
}

/* What data_for_us found to write to the TAP: the virtio header (NULL for a TAP without one), the frame
 * header, and the IP packet inside the plaintext. */
typedef struct {
    const uint8_t *vnet, *ip;
    size_t total;
    uint8_t eth[ETH_LEN];
} Delivery;

/* SocialVPN: a DATA message from a friend device, already in our view (FriendNat.inbound's checks): from the
 * address we gave the device (the link's source), to ours; an ICMP error goes up for Python to check what it
 * quotes (RFC 5927). DATA_GSO's virtio header must say offload work a rewrite carries (social_offload), and goes
 * to a TAP that takes it; for a TAP without offload Python cuts the segments. */
static int social_for_us(Engine *e, FLink *L, const uint8_t *msg, size_t len, Delivery *d) {
    int gso = len && msg[0] == MSG_DATA_GSO;
    size_t base = gso ? 1 + VNET_LEN : 1;
    if (len < base + 20 || (msg[0] != MSG_DATA && !gso) || !L->has_src || (gso && !e->vnet)) return -1;
    const uint8_t *ip = msg + base;
    size_t ihl = (size_t)(ip[0] & 15) * 4, total = (size_t)ip[2] << 8 | ip[3];
    if (ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > len - base) return -1;
    if (be32(ip + 12) != L->src || be32(ip + 16) != e->ip) return -1;
    if (ip[9] == 1 && !(((ip[6] & 0x1F) | ip[7])) && total > ihl && icmp_error(ip[ihl])) return -1;
    if (gso && (total < ihl + (ip[9] == 6 ? 20 : 8) || !vnet_ok(msg + 1, ETH_LEN + total) ||
                !social_offload(msg + 1, ip, ihl)))
        return -1;
    memcpy(d->eth, e->eth, ETH_LEN);
    d->vnet = gso ? msg + 1 : e->vnet ? zero_vnet : NULL;
    d->ip = ip;
    d->total = total;
    L->delivered++;
    return 0;
}

/* Data for us in plaintext `msg` (a ROUTED message, or a social Engine's DATA) from link L: write it to the TAP.
 * Caller holds tab and has NOT marked the packet yet. Returns 0 when it is ours to deliver (and fills d), -1 to
 * pass up. */
static int data_for_us(Engine *e, FLink *L, const uint8_t *msg, size_t len, Delivery *d) {
    if (e->social) return social_for_us(e, L, msg, len, d);
    if (len < ROUTED_LEN + 20 || msg[0] != MSG_ROUTED) return -1;
    uint8_t flags = msg[2], kind = msg[ROUTED_LEN - 1];
    if (kind != KIND_DATA && kind != KIND_DATA_GSO) return -1;
    if (be64(msg + 11) != e->id || be64(msg + 3) != L->peer) return -1;
    if ((be64(msg + 19) == 0 && !(flags & FLAG_PROMISE)) || (flags & FLAG_JOIN)) return -1;
    size_t base = ROUTED_LEN + (kind == KIND_DATA_GSO ? VNET_LEN : 0);
    if (kind == KIND_DATA_GSO && !e->vnet) return -1; /* a TAP without offload: Python cuts the segments */
    if (len < base + 20) return -1;
    const uint8_t *ip = msg + base;
    size_t total;
    if (ip[0] >> 4 == 6) {
        /* As DataPath.deliver_from and VirtualNic.to_tap: for our address, and in a group with certificates from
         * our prefix and the sender's node ID, a sender whose certificate we hold (else Python holds it). */
        if (!e->has6 || len - base < 40) return -1;
        total = 40 + ((size_t)ip[4] << 8 | ip[5]);
        if (total == 40 || total > len - base || memcmp(ip + 24, e->ip6, 16)) return -1;
        if (e->check_sources && (!L->has_src || memcmp(ip + 8, e->ip6, 8) || be64(ip + 16) != L->peer)) return -1;
    } else {
        if (ip[0] >> 4 != 4) return -1;
        total = (size_t)ip[2] << 8 | ip[3];
        if (total < 20 || total > len - base || be32(ip + 16) != e->ip) return -1;
        if (e->check_sources && (!L->has_src || be32(ip + 12) != L->src)) return -1;
    }
    if (kind == KIND_DATA_GSO && !vnet_ok(msg + ROUTED_LEN, ETH_LEN + total)) return -1;
    memcpy(d->eth, e->eth, ETH_LEN);
    if (ip[0] >> 4 == 6) d->eth[12] = 0x86, d->eth[13] = 0xDD;
    d->vnet = !e->vnet ? NULL : kind == KIND_DATA_GSO ? msg + ROUTED_LEN : zero_vnet;
    d->ip = ip;
    d->total = total;
    L->delivered++;
    L->hops += DEFAULT_TTL - msg[1];
    return 0;
}

/* UDP datagrams of one flow that arrive in one batch are written to the TAP as one USO super-frame (virtio_net_hdr
 * GSO_UDP_L4, Linux 6.2): the kernel cuts it into the same datagrams after one write, one netif_rx and one pass
 * of IP input and netfilter, where each datagram alone took all of them. That is most of a small packet's cost
 * at the receiver (docs/datapath.md has the profile); the datagrams and their boundaries are unchanged. What
 * changes is what GRO also changes: the IPv4 IDs (the kernel numbers the segments from the first one's ID, so
 * only datagrams with DF set join: their IDs mean nothing, RFC 6864 section 4.1) and the UDP checksums, which
 * the kernel completes; a datagram whose own checksum is wrong is written alone, for the kernel to drop. IPv6
 * datagrams join the same way (udp6 GSO; IPv6 has no ID and no header checksum), without extension headers and
 * with a checksum, which IPv6 requires (RFC 8200 section 8.1: a zero one is dropped, so it is written alone). */

/* s plus the RFC 1071 sum of n bytes as big-endian 16-bit words (unfolded). Eight bytes at a time in the
 * machine's order, swapped once at the end: the sum does not depend on byte order (RFC 1071 section 2(B)). */
static uint32_t sum16(const uint8_t *p, size_t n, uint32_t s) {
    uint64_t acc = 0;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        acc += (w & 0xFFFFFFFFu) + (w >> 32);
    }
    for (; n >= 2; p += 2, n -= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        acc += w;
    }
    uint8_t last[2] = {n ? p[0] : 0, 0};
    uint16_t w;
    memcpy(&w, last, 2);
    acc += w;
    while (acc >> 16) acc = (acc & 0xFFFF) + (acc >> 16);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    acc = (acc >> 8 | acc << 8) & 0xFFFF;
#endif
    return s + (uint32_t)acc;
}

static uint16_t fold16(uint32_t s) {
    while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)s;
}

static inline void put_le16(uint8_t *p, size_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }

/* The payload length of the UDP datagram in d if it may join others, else 0 (*hl: its IP and UDP headers'
 * length): IPv4 without options, DF and not a fragment, or IPv6 without extension headers and with a checksum; a
 * UDP length that matches, and a checksum that is either left to complete (NEEDS_CSUM, where a UDP checksum is)
 * or right. */
static size_t joinable(const Delivery *d, size_t *hl) {
    const uint8_t *ip = d->ip, *v = d->vnet, *addresses; /* the pseudo-header's (alen bytes) */
    size_t total = d->total, iphl, alen;
    if (!v || v[1] != 0) return 0;
    if (ip[0] == 0x45) {
        if (total <= JOIN_HDR || ip[9] != 17 || ip[6] != 0x40 || ip[7] != 0) return 0;
        iphl = 20, addresses = ip + 12, alen = 8;
    } else if (ip[0] >> 4 == 6) {
        if (total <= JOIN_HDR6 || ip[6] != 17) return 0;
        iphl = 40, addresses = ip + 8, alen = 32;
    } else {
        return 0;
    }
    const uint8_t *udp = ip + iphl;
    *hl = iphl + 8;
    if (((size_t)udp[4] << 8 | udp[5]) != total - iphl) return 0;
    if (v[0] == VNET_F_NEEDS_CSUM) return le16(v + 6) == ETH_LEN + iphl && le16(v + 8) == 6 ? total - *hl : 0;
    if (v[0] != 0) return 0;
    if (iphl == 40 && !(udp[6] | udp[7])) return 0;
    uint32_t pseudo = sum16(addresses, alen, 17 + (uint32_t)(total - iphl)); /* only where it is checked here */
    if ((udp[6] | udp[7]) && fold16(sum16(udp, total - iphl, pseudo)) != 0xFFFF) return 0;
    return total - *hl;
}

static void write_tap(Engine *e, const struct iovec *iov, int n) {
    if (writev(e->tap, iov, n) < 0) e->c_tap_failed++;
}

/* Write the waiting datagrams: as one super-frame if there are several and the TAP takes them, else each as it
 * came. */
static void flush_tap_run(Engine *e) {
    int count = e->tap_count;
    if (!count) return;
    e->tap_count = 0;
    size_t hl = e->tap_hl, iphl = hl - 8;
    if (count > 1 && e->uso) {
        uint8_t head[VNET_LEN + ETH_LEN + JOIN_HDR6];
        uint8_t *ip = head + VNET_LEN + ETH_LEN, *udp = ip + iphl;
        size_t ulen = 8 + e->tap_len;
        head[0] = VNET_F_NEEDS_CSUM;
        head[1] = VNET_GSO_UDP_L4;
        put_le16(head + 2, ETH_LEN + hl);
        put_le16(head + 4, e->tap_seg);
        put_le16(head + 6, ETH_LEN + iphl);
        put_le16(head + 8, 6);
        memcpy(head + VNET_LEN, e->tap_eth, ETH_LEN);
        memcpy(ip, e->tap_heads[0] + VNET_LEN, hl);
        uint16_t p; /* NEEDS_CSUM: the pseudo-header's sum, which the kernel adjusts to each datagram's length */
        if (iphl == 20) {
            size_t total = hl + e->tap_len;
            ip[2] = (uint8_t)(total >> 8), ip[3] = (uint8_t)total;
            ip[10] = ip[11] = 0;
            uint16_t c = (uint16_t)~fold16(sum16(ip, 20, 0));
            ip[10] = (uint8_t)(c >> 8), ip[11] = (uint8_t)c;
            p = fold16(sum16(ip + 12, 8, 17 + (uint32_t)ulen));
        } else {
            ip[4] = (uint8_t)(ulen >> 8), ip[5] = (uint8_t)ulen; /* the payload length: UDP's */
            p = fold16(sum16(ip + 8, 32, 17 + (uint32_t)ulen));
        }
        udp[4] = (uint8_t)(ulen >> 8), udp[5] = (uint8_t)ulen;
        udp[6] = (uint8_t)(p >> 8), udp[7] = (uint8_t)p;
        struct iovec iov[2] = {{head, VNET_LEN + ETH_LEN + hl}, {e->tap_run, e->tap_len}};
        if (writev(e->tap, iov, 2) >= 0) {
            e->c_tap_joined += (uint64_t)count;
            return;
        }
        if (errno != EINVAL) {
            e->c_tap_failed++;
            return;
        }
        e->uso = 0; /* a kernel before 6.2: one by one from now on */
        e->c_join_refused++;
    }
    size_t off = 0;
    for (int i = 0; i < count; i++) {
        size_t n = i < count - 1 ? e->tap_seg : e->tap_len - off;
        struct iovec iov[4] = {{e->tap_heads[i], VNET_LEN}, {e->tap_eth, ETH_LEN},
                               {e->tap_heads[i] + VNET_LEN, hl}, {e->tap_run + off, n}};
        write_tap(e, iov, 4);
        off += n;
    }
}

/* Whether the IP and UDP headers `ip` (hl bytes) and `first`'s differ in what a joined write keeps of the first
 * one for all: the addresses and ports, and IPv4's TOS and TTL or IPv6's traffic class, flow label and hop limit. */
static int other_flow(const uint8_t *ip, const uint8_t *first, size_t hl) {
    if (hl == JOIN_HDR) return memcmp(ip + 12, first + 12, 12) || ip[1] != first[1] || ip[8] != first[8];
    return memcmp(ip, first, 4) || ip[7] != first[7] || memcmp(ip + 8, first + 8, 36);
}

/* Deliver d: joined to the waiting datagrams if it can be (the same family, addresses, ports, TOS and TTL, and no
 * longer than the first: only the last may be shorter), else after them. */
static void to_tap(Engine *e, const Delivery *d) {
    size_t hl = 0, n = e->uso ? joinable(d, &hl) : 0;
    if (e->tap_count) {
        const uint8_t *first = e->tap_heads[0] + VNET_LEN;
        if (!n || e->tap_closed || n > e->tap_seg || e->tap_count >= JOIN_MAX || hl != e->tap_hl ||
            hl + e->tap_len + n > 65535 || other_flow(d->ip, first, hl) || memcmp(d->eth, e->tap_eth, ETH_LEN))
            flush_tap_run(e);
    }
    if (!n) {
        struct iovec iov[3];
        int k = 0;
        if (d->vnet) iov[k++] = (struct iovec){(void *)d->vnet, VNET_LEN};
        iov[k++] = (struct iovec){(void *)d->eth, ETH_LEN};
        iov[k++] = (struct iovec){(void *)d->ip, d->total};
        write_tap(e, iov, k);
        return;
    }
    if (!e->tap_count) {
        e->tap_len = 0;
        e->tap_seg = n;
        e->tap_hl = hl;
        e->tap_closed = 0;
        memcpy(e->tap_eth, d->eth, ETH_LEN);
    }
    memcpy(e->tap_heads[e->tap_count], d->vnet, VNET_LEN);
    memcpy(e->tap_heads[e->tap_count] + VNET_LEN, d->ip, hl);
    memcpy(e->tap_run + e->tap_len, d->ip + hl, n);
    e->tap_len += n;
    e->tap_count++;
    e->tap_closed = n < e->tap_seg;
}

#endif
