/* overlay._fast: the Engine's state (express lanes' bounds, the lanes' shared part, links, flows, held frames,
 * chunks being rebuilt) and the lookups of its tables. Included once, by overlay/_fast.c, after _wire.h and
 * _keys.h. */
#ifndef OVERLAY_FAST_ENGINE_H
#define OVERLAY_FAST_ENGINE_H

/* Express lanes (docs/datapath.md, Express lanes). Under a bulk stream the datagrams a relay or a receiver has
 * not read yet wait in its socket (up to 1.3-2.8 MB, ~2-4 ms at 6 Gbit/s: `ss` in the lab of bench/peers.py), and
 * a ping in the stream's lane waited behind them at each hop. A small packet of a flow that sent nothing bigger
 * for SPARSE_NS is sealed in its lane's express lane (lane k + EXPRESS_LANE: its own counter and replay window,
 * so a datagram that overtakes others of the lane is not judged against them), whose datagrams the receiver's
 * steering gives to a socket of their own that its Engine reads first; a relay passes them on in its express
 * lane. A flow that sends big packets keeps all of its packets in its lane, in order: its small ones never
 * overtake its big ones. Measured (2026-12-07, a to c through b under one TCP stream in the ping's lane, 3 labs
 * each, 40 pings): RTT median 0.58-1.04 ms with express lanes, 1.30-1.34 without; what is left, by elimination,
 * is the sender's TAP queue, where the stream's segments wait ahead of the ping (its depth not measured). Our
 * choices: a ping, an ACK, a keystroke or a DNS question fits EXPRESS_MAX; SPARSE_NS is longer than a 4 MB socket takes to drain at
 * 1 Gbit/s (34 ms). A node of more than EXPRESS_LANE lanes uses every lane for bulk and sends nothing express. */
#define EXPRESS_LANE (LANES / 2)
#define EXPRESS_MAX 256
#define SPARSE_NS 100000000LL
#define SPARSE_SLOTS 1024

typedef struct {
    struct sockaddr_storage sa;
    socklen_t len;
    int chunk; /* the chunk size on the path to this address, from its route's MTU (Python's chunk_for) */
} Addr;

/* A flow's destination: an IPv6 address, or an IPv4 one mapped into IPv6 (::ffff:a.b.c.d, RFC 4291 section
 * 2.5.5.2), so that one table serves both. Its slot is its last 32 bits, the IPv4 address as before and, for
 * an address derived from a node ID (overlay/ids.py), random bits. All zeros: no flow. */
typedef struct {
    uint8_t b[16];
} Dst;

static const uint8_t v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};

static inline uint32_t slot_of(const Dst *d) { return be32(d->b + 12) % FLOW_SLOTS; }
static inline int dst_eq(const Dst *a, const Dst *b) { return memcmp(a->b, b->b, 16) == 0; }
static inline int dst_is_v4(const Dst *d) { return memcmp(d->b, v4_mapped, 12) == 0; }

/* A message whose chunks arrive one by one (pending_chunk): chunk i's part at i * PART_MAX in buf, len[i] long. */
typedef struct {
    struct sockaddr_storage from;
    int64_t began;
    uint32_t id;
    int count;      /* 0: a free slot */
    uint64_t have;  /* bit i: chunk i is in */
    uint16_t len[MAX_CHUNKS];
    uint8_t *buf; /* malloc'd by the thread at the slot's first use (MAX_CHUNKS * PART_MAX), freed with the Engine */
} Pending;

typedef struct {
    uint64_t peer;
    Keys *keys;       /* strong reference */
    uint32_t local;   /* our receiver index of the session */
    uint32_t remote;  /* the peer's */
    int direct;       /* 1: UDP to `ep`; 0: a tunnel through `relay` */
    Addr ep;
    uint64_t relay;
    int big_ok;       /* 60 KB datagrams cross this link (the fragment probe was answered) */
    int tunnel_ok;    /* the peer takes tunnelled packets as TUNNEL packets (its HELLO said so) */
    int lanes_ok;     /* the peer keeps a replay window per lane (its HELLO said so): we send in ours */
    int has_src;      /* cryptokey routing: data from this peer must come from `src` */
    uint32_t src;
    uint64_t tx, rx, delivered, hops;
    int tx_seen, rx_seen;
    /* The session before the last rekey, still accepted (never sent on) so that what the peer sent before it
     * moved to the new one is not lost; NULL when there is none. */
    Keys *prev_keys;
    uint32_t prev_local;
    /* A responder's session for a rekey the peer started: opened here from its first packet, and `next_used`
     * tells Python (take()) to move the link over, as it does for a packet it opens itself. */
    Keys *next_keys;
    uint32_t next_local;
    int next_used;
} FLink;

/* A flow is used until `expires`; the first packet after it asks Python to look again (UP_FLOW) and the flow
 * stays in use while Python answers, until `hard`: a refresh costs the packets nothing. A slot for `dst` with
 * `hard` 0 is no flow: Python answered without one, and frames to `dst` go up until it sets one. */
typedef struct {
    Dst dst;
    int checking;
    uint64_t peer;
    int64_t expires, hard;
    uint8_t header[ROUTED_LEN];
    /* SocialVPN (a social Engine): `hlen` 1 (the DATA byte, where a group's flow has its 28-byte routed header),
     * and the packet leaves with its source and destination rewritten to `nat_src` and `nat_dst` (rewrite_head). */
    int hlen;
    uint32_t nat_src, nat_dst;
    /* Set while frames to `dst` that went up (the last numbered `wait`) may not yet have left through Python:
     * this flow's frames are held (stage) until Python says it got that far (Engine_sent), from `since`. */
    int pending;
    uint32_t wait;
    int64_t since;
    /* Set while the one frame to `dst` that found no flow (numbered `wait`) is with Python, from `since`: the
     * next ones are held until Python has taken it, and then leave on the flow it set or go up behind it.
     * Without it every frame read meanwhile went up (112-275 for 4 TCP streams at ~9 Gbit/s whose flows had
     * gone), and Python, slower than the stream, kept the flow pending until it had sent them all. */
    int asking;
} Flow;

typedef struct {
    uint32_t off, len, slot;
} Staged;

/* The lanes of one node (Engine_init's `first`) share what each carries and the lane of each TCP connection the
 * node opened, so that a connection keeps to the lane least busy when it opened. A multi-queue TAP gives a flow
 * the queue of its hash, so two bulk flows share a lane (one core at each end) as often as not: with two lanes,
 * iperf3 --bidir relayed through a member carried 7,497 Mbit/s (median of 3 runs) when its two flows shared a
 * lane and 8,192 (median of 5) when they did not (2026-12-06, one lab).
 * The TAP sends a flow out by the queue its last packet came in by (tun_automq_select_queue), and the peer's
 * Engine writes what it receives by the queue of the lane it was sealed in (steer_lanes). But the kernel notes
 * a write's queue only after it has handled the written packet, so a SYN-ACK, sent while its SYN is handled,
 * leaves by the hash (measured: 18 of 32 SYN-ACKs left by their SYN's queue, against 72 of 72 UDP answers sent a
 * moment later); sealing the SYN in a lane is not enough. Sealing every segment of the connection in its lane,
 * whichever queue it was read from, is: the peer writes them all by that lane's queue and answers in that
 * lane, and its answers written here by that queue bring the rest of ours there, within a round trip or two.
 * What a lane carried is measured over short windows, and a lane that carried nothing for QUIET_NS carries no
 * bulk flow (whose packets are under a millisecond apart from ~10 Mbit/s up): its last window no longer counts,
 * and its next starts afresh. With 100 ms windows and 20 ms of quiet, the lane of one iperf3 run still looked
 * busy when the next run opened its connections a few milliseconds later, and all of them went to the other.
 *
 * UDP flows and pings (ICMP echo requests) this node sends pick a lane the same way at their first packet: a ping
 * or a DNS query started while a bulk stream fills one lane goes in another, instead of by the TAP's hash into
 * the stream's lane half the time, where it waited behind the stream in the TAP's queue (docs/datapath.md, Under
 * load). There is no SYN to say which end began, so each end picks for what it sends; the answering end's pick
 * only decides where its answers go. A slot (`flow`) holds a flow while it carried something in the last
 * FLOW_LIVE stamps; another flow of its slot meanwhile keeps the reading Engine's lane and takes nothing, so two
 * live flows of one slot never evict each other packet by packet (which would move them between lanes). A flow
 * quiet for longer has nothing in flight, and picks again. */
#define LOAD_NS 10000000LL
#define LOAD_IDLE 10 /* packets per window below which a lane counts as idle (1,000 a second) */
#define QUIET_NS 5000000LL
#define CONN_BITS 10 /* 2^CONN_BITS slots in `conn`, direct-mapped: an evicted connection goes by the queue it is read from */
typedef struct {
    atomic_int n;                           /* the node's lanes: the highest lane + 1 of the Engines sharing this */
    atomic_uint next;                       /* turns among lanes equally busy */
    atomic_uint_fast64_t load[LANES];       /* packets in the lane's last window, per LOAD_NS */
    atomic_int_fast64_t active_at[LANES];   /* when the lane last carried something */
    atomic_uint_fast64_t conn[1 << CONN_BITS]; /* a connection's key but its low byte, | 0x100, | its lane */
    atomic_uint_fast64_t flow[1 << CONN_BITS]; /* a UDP flow's or ping's key but its low 24 bits, stamp, 0x80, lane */
} LaneShare;
#define FLOW_STAMP(t) (((uint64_t)(t) >> 24 & 0xFFFF) << 8) /* 16.8 ms units (2^24 ns), 16 bits: wraps after 18 min */
#define FLOW_LIVE 240 /* stamps (~4 s): longer than ping's default second between requests */

typedef struct {
    PyObject_HEAD
    int tap, udp, up, stop_fd, epfd;
    int xudp; /* the express socket (Express lanes), -1 for none: read before `udp`; sealing in express lanes */
    int vnet, gso, chunk, check_sources;
    int lane; /* this Engine's lane (LANES): the counters it sends with, to peers that take lanes */
    LaneShare *share;   /* the node's lanes: this Engine's own (`first` NULL) or the first Engine's */
    PyObject *first;    /* the Engine whose `share` this is (strong reference), NULL for its owner */
    int64_t load_start; /* this lane's current load window (the thread's) */
    uint64_t load_base;
    uint64_t id;
    uint32_t ip, mask, net, bcast;
    int has6, prefix6; /* IPv6 inside the VPN ([vnic] address6): our address and its prefix length */
    uint8_t ip6[16];
    /* A SocialVPN node's Engine: flows are DATA messages to friend devices, rewritten into their view; what it
     * delivers is DATA from a device in ours; it relays nothing. */
    int social;
    uint8_t nat_head[60 + 20]; /* a rewritten IPv4 header (options included) and TCP's first 20 bytes */
    uint8_t eth[ETH_LEN]; /* the frame header for what we deliver: kernel's MAC, gateway MAC, IPv4 */
    pthread_mutex_t tab;
    FLink *links;
    int nlinks;
    Flow *flows;
    /* Ordered hand-over (Engine_set_flow): frames passed up are numbered, and each flow slot keeps the number
     * of the last frame to its address(es) that went up; written under `tab`, never cleared. */
    uint32_t up_seq, *up_last;
    atomic_uint py_sent;  /* the number of the last frame passed up that Python has sent (Engine_sent) */
    atomic_int staging;   /* frames are held: Python's Engine_sent wakes the thread (wake_fd) */
    int wake_fd;
    int64_t stage_ns; /* STAGE_NS unless the constructor says otherwise (hold_limit) */
    /* Frames held, in order, one after another in `stage_buf` (the thread's alone), and how many per flow slot:
     * while a frame to an address is held, every later frame to it goes behind, so that none overtakes another
     * of its flow; frames to other members pass (a flow asked of Python held a whole node's traffic before). */
    Staged stage[STAGE_MAX];
    uint16_t held_in[FLOW_SLOTS];
    int stage_n;
    size_t stage_len;
    uint8_t *stage_buf;
    pthread_t thread;
    int running;
    uint32_t message_id; /* the low 24 bits of the last chunk train's ID (next_message_id) */
    atomic_int note_pending;
    int64_t last_note;
    int64_t now; /* when the thread's current batch began: one clock read per batch, not per packet */
    uint64_t read_bytes; /* what the thread read from its TAP and socket (the poll's rule: engine_main) */
    /* counters (the thread writes, Python reads: word-sized, a torn read is off by one at worst) */
    uint64_t c_frames, c_frames_up, c_datagrams, c_datagrams_up, c_relayed, c_relayed_trains, c_up_dropped,
        c_send_failed, c_tap_failed, c_gso_fallback, c_mtu_refused, c_tap_joined, c_join_refused, c_flow_pending,
        c_flow_asked, c_staged, c_stage_dropped, c_unreachable, c_chunks_rebuilt, c_chunks_dropped, c_syn_moved,
        c_conn_moved, c_polls, c_express_sent, c_express_read, c_flow_started, c_flow_moved, c_polls_skipped;
    uint64_t slice_ns; /* the thread's scheduler slice if short_slice set it, else 0 (the thread writes it once) */
    int64_t big_at[SPARSE_SLOTS]; /* by a hash of the flow: when it last sent a packet above EXPRESS_MAX */
    int run_express;              /* the run (slot_for) holds express datagrams */
    Pending pending[PENDING_SLOTS];
    /* buffers of the thread */
    uint8_t *rbuf, *plain, *plain2, *sealed, *inner, *joined, *run, *tap_run;
    size_t run_len, run_seg;
    int run_count;
    Addr run_to;
    /* UDP datagrams of one flow waiting to be written to the TAP as one (to_tap): each one's virtio header and
     * IP and UDP headers (`tap_hl` bytes: JOIN_HDR or JOIN_HDR6) as they came, and their payloads one after
     * another in `tap_run` */
    int uso; /* 1 until the TAP refuses a joined write */
    int tap_count, tap_closed;
    size_t tap_len, tap_seg, tap_hl;
    uint8_t tap_eth[ETH_LEN];
    uint8_t tap_heads[JOIN_MAX][VNET_LEN + JOIN_HDR6];
} Engine;

static FLink *link_by_peer(Engine *e, uint64_t peer) {
    for (int i = 0; i < e->nlinks; i++)
        if (e->links[i].peer == peer) return &e->links[i];
    return NULL;
}

/* The link a session index of ours belongs to, and the keys of that session (*k: current, previous or next). */
static FLink *link_by_index(Engine *e, uint32_t index, Keys **k) {
    for (int i = 0; i < e->nlinks; i++) {
        FLink *L = &e->links[i];
        if (L->local == index) {
            *k = L->keys;
            return L;
        }
        if (L->prev_keys && L->prev_local == index) {
            *k = L->prev_keys;
            return L;
        }
        if (L->next_keys && L->next_local == index) {
            *k = L->next_keys;
            return L;
        }
    }
    return NULL;
}

static int sockaddr_eq(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
    if (a->ss_family != b->ss_family) return 0;
    if (b->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, 16);
}

static int addr_eq(const Addr *a, const struct sockaddr_storage *b) { return sockaddr_eq(&a->sa, b); }

static int addr_same(const Addr *a, const Addr *b) { return addr_eq(a, &b->sa); }

#endif
