/* overlay._fast: the per-packet work of established links, compiled.
 *
 * Two types (docs/datapath.md says why and what it measured):
 *
 * Keys (overlay/_keys.h): one link session's AES-256-GCM keys, its send counters and its replay windows, one of
 *   each per lane. Every session of the node (overlay/transport/session.py) seals and opens through it, from Python and from
 *   the Engines' threads, so a counter is never used twice and a packet is never accepted twice, whichever side
 *   handles it. Wire format (overlay/wire.py): type (1) | receiver index (4) | counter (8) | AES-GCM(plaintext)
 *   | tag (16); the counter's top byte is its lane (LANES); nonce = 32 zero bits || counter (Noise section
 *   12.3); associated data = the 13-byte header. A lane's replay window holds its newest counter and the
 *   REPLAY_WINDOW below it (RFC 6479's sliding window).
 *
 * Engine: a thread of its own that owns a TAP fd (one queue of a multi-queue TAP) and a UDP socket's reads; a
 *   node runs one per lane, each with its own tables (Python keeps them alike), each sealing in its own lane
 *   but for the TCP connections the node opens, which keep to the lane chosen at their SYN, and the UDP flows and
 *   pings it sends, which keep to the lane chosen at their first packet (LaneShare).
 *   Data between this node and a member it has a link to (direct, or a tunnel through a neighbour) is read,
 *   sealed, sent, received, opened, checked and written without entering Python; a neighbour's RELAY is passed
 *   on the same way. A SocialVPN node's Engine (`social`) carries DATA between it and its friends' devices
 *   instead, each packet rewritten into the device's view of the addresses (rewrite_head), and relays nothing.
 *   Everything else (ARP, neighbour discovery, handshakes, control messages, STUN, unknown senders, roaming
 *   peers, data that needs a lookup) goes up to the asyncio side unchanged, through a SOCK_SEQPACKET socketpair,
 *   and is handled there exactly as without the Engine. The Engine marks a replay window only for packets it
 *   handled, so a packet it passes up is opened by Python as if the Engine did not exist.
 *   Python keeps the tables current: links (session, path, whether 60 KB datagrams pass, the sender's
 *   allowed source address) and flows (destination address, IPv4 or IPv6 -> link and routed header), which
 *   expire after a TTL so the slow path looks again (DHT cache, routes) on a regular beat.
 *
 * Threads and locks: an Engine thread never takes the GIL. `tab` guards an Engine's tables; a Keys' send and recv
 * locks guard its counters and windows, and its cipher contexts where they cannot be shared (OpenSSL's; ipsec-mb
 * keeps a call's state on the caller's stack, so Engines seal and open one session at once: gcm_shared). Order:
 * tab, then keys. Python changes the tables with the GIL held; each Engine holds a reference to every Keys in its
 * tables and drops one only after releasing its `tab`, so no thread sees freed Keys.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <linux/filter.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_gcm.h"

#define HDR 13
#define TAG 16

#define PT_TRANSPORT 0x83
#define PT_SEALED 0x84
#define PT_CHUNK 0x85
#define PT_TUNNEL 0x86
#define RELAY_HEAD 9                      /* RELAY or RELAYED, peer(8) */
#define TUNNEL_PART (RELAY_HEAD + TAG)    /* a TUNNEL packet's encrypted relay head */
#define TUNNEL_OFF (HDR + TUNNEL_PART)    /* where its inner link packet starts */
#define MSG_ROUTED 0x04
#define MSG_RELAY 0x05
#define MSG_RELAYED 0x06
#define MSG_DATA 0x11 /* SocialVPN: an IPv4 packet in the receiver's view of the addresses (overlay/social) */
#define MSG_DATA_GSO 0x14 /* ... with the virtio_net_hdr of its offload work in front (a TCP super-frame) */
#define KIND_DATA 0x01
#define KIND_DATA_GSO 0x09
#define FLAG_JOIN 0x08
#define FLAG_PROMISE 0x10
#define ROUTED_LEN 28
#define VNET_LEN 10
#define ETH_LEN 14
#define DEFAULT_TTL 64

#define CHUNK_HDR 7
#define MAX_CHUNKS 64
#define MAX_CHUNK 1472
#define PART_MAX (MAX_CHUNK - CHUNK_HDR)
#define MAX_DATAGRAM 65535
/* Messages whose chunks arrive one by one, rebuilt at once, and how long a message may take (as
 * overlay/transport/chunks.py's Reassembly: a chunk later than that belongs to a lost message). */
#define PENDING_SLOTS 16
#define PENDING_NS 1000000000LL
#define MAX_RUN 64
#define MAX_RUN_BYTES 65000
#define BATCH 64
/* Our choice: a wake-up's work on one fd ends after BATCH packets or BATCH_BYTES, whichever comes first, so the
 * other direction waits behind at most ~2 super-frames (~100 us) rather than 64 (~3 ms: the RTT under load). */
#define BATCH_BYTES (64 * 1024)
#define BUF (65536 + 512)
/* Datagrams in one joined TAP write (to_tap): a batch's worth, half the kernel's UDP_MAX_SEGMENTS (128). */
#define JOIN_MAX 64
#define JOIN_HDR (20 + 8) /* the IPv4 header without options, and the UDP header */
#define JOIN_HDR6 (40 + 8) /* the IPv6 header without extension headers, and the UDP header */
#define VNET_F_NEEDS_CSUM 1
#define VNET_F_DATA_VALID 2
#define VNET_GSO_UDP_L4 5 /* linux/virtio_net.h, accepted from a TAP since Linux 6.2 */
#define SOL_UDP_ 17
#define UDP_SEGMENT_ 103
#define UDP_GRO_ 104

#define MAX_LINKS 4096
#define FLOW_SLOTS 4096 /* direct-mapped: a collision evicts, the slow path puts it back */

#define UP_DATAGRAM 1
#define UP_FRAME 2
#define UP_NOTE 3
#define UP_FLOW 4
#define UP_UNREACHABLE 5
#define UP_HDR 20
/* Frames held while a flow waits for Python to send what went up before it (Engine_set_flow). Our choices:
 * as many frames as WireGuard-go stages for a peer without a session (QueueStagedSize, 128) times two, at most
 * 1 MB; a flow Python has not caught up with in 50 ms (the default hold_limit: Python normally answers within
 * one turn of its event loop) is given back to Python. */
#define STAGE_MAX 256
#define STAGE_BYTES (1 << 20)
#define STAGE_NS 50000000LL
/* Our choice: Python hears about link activity at most every 500 ms (maintenance waits BUSY_PING = 2 s for an
 * answer on a busy link before it pings: overlay/routing/maintenance.py). */
#define NOTE_NS 500000000LL

static PyObject *Replayed, *Forged, *Exhausted;

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static inline unsigned le16(const uint8_t *p) { return p[0] | (unsigned)p[1] << 8; }
static inline void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static inline void put64(uint8_t *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, (uint32_t)v); }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Keys (overlay/_keys.h)                                                                                       */

#include "_keys.h"

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

/* AES-256-GCM with any key, nonce and associated data: the handshake's cipher (overlay/transport/noise.py). */
static PyObject *aesgcm(PyObject *args, PyObject *kw, int encrypt) {
    Py_buffer key, nonce, ad, data;
    PyObject *name = NULL;
    static char *names[] = {"key", "nonce", "ad", "data", "impl", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*y*y*|O", names, &key, &nonce, &ad, &data, &name)) return NULL;
    PyObject *out = NULL;
    Gcm g = {0};
    gcm_impl impl;
    if (key.len != 32 || nonce.len != 12) {
        PyErr_SetString(PyExc_ValueError, "AES-256-GCM takes a 32-byte key and a 12-byte nonce");
    } else if (!encrypt && data.len < TAG) {
        PyErr_SetString(Forged, "ciphertext shorter than its tag");
    } else if (gcm_impl_of(name, &impl)) {
        /* error set */
    } else if (gcm_init(&g, impl, key.buf, encrypt)) {
        PyErr_SetString(PyExc_RuntimeError, "cannot make an AES-256-GCM context");
    } else if ((out = PyBytes_FromStringAndSize(NULL, encrypt ? data.len + TAG : data.len - TAG))) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
        int rc;
        if (encrypt) {
            struct iovec piece = {data.buf, (size_t)data.len};
            size_t len;
            rc = gcm_seal_nonce(&g, nonce.buf, ad.buf, (int)ad.len, NULL, 0, &piece, 1, o, &len);
        } else {
            const uint8_t *d = data.buf;
            struct iovec ct = {(void *)d, (size_t)(data.len - TAG)};
            rc = gcm_open_nonce(&g, nonce.buf, ad.buf, (int)ad.len, NULL, 0, &ct, 1, d + data.len - TAG, o);
        }
        if (rc) {
            Py_CLEAR(out);
            PyErr_SetString(encrypt ? PyExc_RuntimeError : Forged,
                            encrypt ? "AES-GCM failed" : "ciphertext fails authentication");
        }
    }
    gcm_free(&g);
    PyBuffer_Release(&key);
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&ad);
    PyBuffer_Release(&data);
    return out;
}

static PyObject *aesgcm_seal(PyObject *m, PyObject *args, PyObject *kw) { return aesgcm(args, kw, 1); }
static PyObject *aesgcm_open(PyObject *m, PyObject *args, PyObject *kw) { return aesgcm(args, kw, 0); }

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

static PyMethodDef module_methods[] = {
    {"aesgcm_seal", (PyCFunction)(void (*)(void))aesgcm_seal, METH_VARARGS | METH_KEYWORDS,
     "aesgcm_seal(key, nonce, ad, plaintext, impl=None) -> ciphertext + tag"},
    {"aesgcm_open", (PyCFunction)(void (*)(void))aesgcm_open, METH_VARARGS | METH_KEYWORDS,
     "aesgcm_open(key, nonce, ad, ciphertext + tag, impl=None) -> plaintext; Forged"},
    {"steer_lanes", steer_lanes, METH_VARARGS,
     "steer_lanes(fd, lanes, express=False): the reuseport group of fd gives each datagram to the socket of its "
     "lane (express: lanes + k is the socket of lane k's express datagrams)"},
    {NULL}};

/* ---------------------------------------------------------------------------------------------------------- */
/* Engine                                                                                                       */

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

/* -- up to Python ------------------------------------------------------------------------------------------- */

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

/* -- sending ------------------------------------------------------------------------------------------------ */

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

/* -- from the TAP ------------------------------------------------------------------------------------------- */

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

/* -- from the UDP socket ------------------------------------------------------------------------------------ */

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

/* -- to the TAP --------------------------------------------------------------------------------------------- */

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

/* After data it carried itself the thread polls up to SPIN_NS before it sleeps, yielding the CPU to anything
 * runnable: the answer to what it just sent (a ping's reply, a TCP ACK) usually comes within that, and is then
 * taken without a wake-up (each one 10-100 us on a virtual machine, four per round trip). Control traffic
 * (passed up to Python) does not make it spin: a hundred idle nodes on one machine stay idle. Nor does data it
 * only relays for others: a relay's poll took a CPU the two ends' threads needed, and bought nothing. Measured
 * (2026-12-07, the lab of bench/peers.py, 6 alternating labs of 4 x 40 pings each, medians): relayed idle RTT
 * 0.400 ms with the relay polling, 0.388 without (5 labs of 6 lower), direct 0.240 / 0.239; with no poll at
 * all, relayed 0.405 and direct 0.289 (3 labs each). */
#define SPIN_NS 300000LL
/* ... unless it carried BUSY_PACKETS or more in the last SPIN_NS window (~107k packets/s): then packets come
 * faster than a wake-up takes, a wake-up costs nothing per packet, and polling would hand each one on alone,
 * losing the batches that GSO sends and joined TAP writes are made of, and taking the CPU the applications
 * need. Measured (2026-12-05, 64-byte UDP flood relayed through three nodes, two cores, 6 runs each): iperf3's
 * server read 81-93k packets/s while every Engine polled, 115-142k/s with this; idle RTT and TCP unchanged
 * within the host's noise (by arithmetic, 7 Gbit/s of 64 KB super-frames and their ACKs is ~10 packets per
 * window: not this rule but the next one stops a TCP stream's poll). */
#define BUSY_PACKETS 32
/* ... or read BUSY_BYTES (a super-frame; ~1.7 Gbit/s): a bulk stream's next frame comes as surely without the
 * poll, and on a host whose cores are all busy the poll's yields took CPU from the applications and the other
 * Engines. Measured (2026-12-07, the lab of bench/peers.py, alternating labs, medians of 6 runs, before / after):
 * one TCP stream 7,833 / 8,336 Mbit/s direct at 1.69 / 1.13 CPU s per GB, 6,746 / 7,925 relayed; four streams
 * relayed 8,317 / 9,069; idle RTT unchanged (0.220 / 0.221 ms direct: a ping is ~100 bytes), RTT under a
 * stream 1.14 / 0.67 ms direct (docs/datapath.md, Latency). */
#define BUSY_BYTES 65536
/* ... and for as long as polling pays. Between packets of a flow that come a millisecond or more apart (a voice
 * call, a game, a paced UDP stream) every poll ran its 300 us for nothing, at both ends: measured (2026-12-07, the
 * lab of bench/peers.py, iperf3 -u with 200-byte datagrams, a's and b's CPU), 16 % of a core at each end for 500
 * packets a second and 32 % for 2,000 or 8,000 (iperf3 sends them in bursts a millisecond apart), where fastd
 * took 1-6 %. So the window adapts as Linux's KVM adapts a virtual CPU's halt polling (halt_poll_ns), by how long
 * the wait for the next event turned out to be: within the window, it stays; longer than SPIN_NS, it halves (to
 * nothing below POLL_MIN); in between, it doubles (from POLL_START, up to SPIN_NS). Two windows: after a batch
 * that sent what the TAP gave (an answer may come back) and after one that only delivered to the TAP (the
 * application may answer through it), as the two waits differ: a ping's sender waits for the reply after the
 * request and for the next request after the reply, and its answerer's kernel answers at once, and then
 * nothing comes for the answer it sent. */
#define POLL_MIN 20000LL
#define POLL_START 50000LL
enum { POLL_SENT, POLL_DELIVERED };

/* The thread's scheduler slice. Under load a ping waited for CPUs as much as for anything of ours: with both
 * cores busy (a TCP stream through three nodes on two), a woken Engine could wait for the running task's slice to
 * end (1.4 ms here: the kernel's base slice, scaled by the CPUs), at each of the six wake-ups of a relayed round
 * trip. Linux's EEVDF scheduler (6.12 and later) lets a thread ask for a shorter slice, unprivileged (sched_attr's
 * sched_runtime for SCHED_OTHER, 0.1-100 ms): its deadlines come sooner, so its wake-up preempts a task with a
 * longer slice. An Engine's work per wake-up is one batch of at most 64 KB (~50-100 us), so it asks for the
 * shortest. Measured (2026-12-07, the lab of bench/peers.py, a to c through b under one TCP stream, alternating
 * labs): 100 pings 20 ms apart, 6 labs each, 90th percentile 0.52-0.90 ms with it and 0.87-2.01 without (medians
 * 0.09-0.23 and 0.12-0.41); 40 pings 50 ms apart, 4 labs each, 0.27-1.11 and 1.01-2.13, the stream's rate
 * within 1.5 % of the lab before it. The thread's nice value and policy stay as they were (a node started with `nice`
 * keeps it; SCHED_BATCH or SCHED_IDLE is left alone); older kernels ignore the field, and the thread reports 0. */
#define SLICE_NS 100000ULL
#define SCHED_ATTR_SIZE 48 /* SCHED_ATTR_SIZE_VER0: up to sched_period */
struct sched_attr_ {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
};
static uint64_t short_slice(void) {
#ifdef SYS_sched_setattr
    struct sched_attr_ a;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, SCHED_ATTR_SIZE, 0) < 0 || a.policy != SCHED_OTHER) return 0;
    a.size = SCHED_ATTR_SIZE;
    a.flags &= 1; /* SCHED_FLAG_RESET_ON_FORK as it was; nothing else asked */
    a.runtime = SLICE_NS;
    if (syscall(SYS_sched_setattr, 0, &a, 0) < 0) return 0;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, SCHED_ATTR_SIZE, 0) < 0) return 0;
    return a.runtime == SLICE_NS ? a.runtime : 0;
#else
    return 0;
#endif
}

static void *engine_main(void *arg) {
    Engine *e = arg;
    char name[16];
    snprintf(name, sizeof name, "ipop-lane%d", e->lane); /* what top -H and /proc/<pid>/task/<tid>/comm show */
    pthread_setname_np(pthread_self(), name);
    e->slice_ns = short_slice();
    struct epoll_event evs[8];
    int64_t spin_until = 0, window_end = 0;
    uint64_t window_base = 0, window_bytes = 0;
    int busy = 0;
    int64_t window[2] = {SPIN_NS, SPIN_NS}, wait_from = 0; /* wait_from: a wait for the next event, timed */
    int wait_kind = POLL_SENT;
    for (;;) {
        if (e->stage_n) release_staged(e);
        /* While frames are held, look again every 10 ms: a flow Python never catches up with lets go (hold_limit). */
        int n = epoll_wait(e->epfd, evs, 8, spin_until ? 0 : e->stage_n ? 10 : -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            return NULL;
        }
        if (n == 0) {
            if (now_ns() < spin_until) sched_yield();
            else spin_until = 0;
            continue;
        }
        if (wait_from) { /* the wait this event ends: how long should the next such poll be? */
            int64_t waited = now_ns() - wait_from, *w = &window[wait_kind];
            if (waited > SPIN_NS) *w = *w / 2 < POLL_MIN ? 0 : *w / 2;
            else if (waited > *w) *w = *w * 2 < POLL_START ? POLL_START : *w * 2 > SPIN_NS ? SPIN_NS : *w * 2;
            wait_from = 0;
        }
        uint64_t carried = e->c_frames + e->c_datagrams, relayed = e->c_relayed, sent = e->c_frames;
        for (int i = 0; i < n; i++) /* the express socket first (Express lanes) */
            if (evs[i].data.fd == e->xudp) drain_udp(e, e->xudp);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == e->stop_fd) return NULL;
            if (fd == e->wake_fd) {
                uint64_t count;
                if (read(e->wake_fd, &count, sizeof count) < 0) { /* EAGAIN: another read took it */
                }
            }
            if (fd == e->tap) drain_tap(e);
            else if (fd == e->udp) drain_udp(e, e->udp);
        }
        uint64_t total = e->c_frames + e->c_datagrams;
        if (total != carried) {
            int64_t t = now_ns();
            count_load(e, t, carried, total);
            /* A new window: was the one before busy? After a pause it counts from its start, so the first window
             * after a flood may go without the poll. */
            if (t >= window_end) {
                busy = total - window_base >= BUSY_PACKETS || e->read_bytes - window_bytes >= BUSY_BYTES;
                window_base = total;
                window_bytes = e->read_bytes;
                window_end = t + SPIN_NS;
            }
            if (busy) {
                spin_until = 0;
            } else if (total - carried > e->c_relayed - relayed) { /* ours, not only relayed */
                wait_kind = e->c_frames != sent ? POLL_SENT : POLL_DELIVERED;
                wait_from = t;
                if (!window[wait_kind]) {
                    spin_until = 0;
                    e->c_polls_skipped++;
                } else {
                    if (spin_until <= t) e->c_polls++; /* a new poll, not one extended */
                    spin_until = t + window[wait_kind];
                }
            }
        }
    }
}

/* -- the Python side ---------------------------------------------------------------------------------------- */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (!e) return NULL;
    e->tap = e->udp = e->xudp = e->up = e->stop_fd = e->wake_fd = e->epfd = -1;
    pthread_mutex_init(&e->tab, NULL);
    return (PyObject *)e;
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kw) {
    static char *names[] = {"tap_fd", "vnet_hdr", "udp_fd", "up_fd", "gso", "chunk", "node_id", "address",
                            "prefix_len", "check_sources", "hold_limit", "lane", "first", "address6", "prefix6_len",
                            "social", "express_fd", NULL};
    int tap, vnet, udp, upfd, gso, chunk, prefix, check, lane = 0, prefix6 = 64, social = 0, xudp = -1;
    PyObject *first = Py_None, *address6 = Py_None;
    double hold = STAGE_NS / 1e9;
    unsigned long long id;
    unsigned int address;
    if (e->links) {
        PyErr_SetString(PyExc_RuntimeError, "an Engine is set up once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ipiipiKIip|$dO&OOipi", names, &tap, &vnet, &udp, &upfd, &gso, &chunk,
                                     &id, &address, &prefix, &check, &hold, lane_arg, &lane, &first, &address6,
                                     &prefix6, &social, &xudp))
        return -1;
    if (xudp >= 0 && lane >= EXPRESS_LANE) {
        PyErr_Format(PyExc_ValueError, "express sockets are for lanes 0 to %d", EXPRESS_LANE - 1);
        return -1;
    }
    if (social && (!check || address6 != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "a social Engine checks every source and has no IPv6");
        return -1;
    }
    e->social = social;
    if (address6 != Py_None) {
        if (!PyBytes_Check(address6) || PyBytes_GET_SIZE(address6) != 16 || prefix6 < 16 || prefix6 > 120) {
            PyErr_SetString(PyExc_ValueError, "address6 is 16 bytes and prefix6_len /16 to /120 (VirtualNic's)");
            return -1;
        }
        e->has6 = 1;
        e->prefix6 = prefix6;
        memcpy(e->ip6, PyBytes_AS_STRING(address6), 16);
    }
    if (first != Py_None && (!PyObject_TypeCheck(first, Py_TYPE(e)) || !((Engine *)first)->share ||
                             ((Engine *)first)->first || ((Engine *)first)->lane == lane)) {
        PyErr_SetString(PyExc_ValueError, "first is the node's first Engine, set up, of another lane");
        return -1;
    }
    e->lane = lane;
    if (!(hold > 0 && hold < 60)) {
        PyErr_SetString(PyExc_ValueError, "hold_limit is seconds, above 0 and below 60");
        return -1;
    }
    e->stage_ns = (int64_t)(hold * 1e9);
    if (prefix < 1 || prefix > 30 || chunk <= CHUNK_HDR || chunk > MAX_CHUNK) {
        PyErr_SetString(PyExc_ValueError, "prefix length or chunk size out of range");
        return -1;
    }
    e->xudp = xudp;
    e->tap = tap, e->vnet = vnet, e->udp = udp, e->up = upfd, e->gso = gso, e->chunk = chunk, e->id = id;
    e->check_sources = check;
    e->uso = vnet;
    e->ip = address;
    e->mask = 0xFFFFFFFFu << (32 - prefix);
    e->net = address & e->mask;
    e->bcast = e->net | ~e->mask;
    e->eth[12] = 0x08;
    e->links = PyMem_Calloc(MAX_LINKS, sizeof(FLink));
    e->flows = PyMem_Calloc(FLOW_SLOTS, sizeof(Flow));
    e->up_last = PyMem_Calloc(FLOW_SLOTS, sizeof(uint32_t));
    e->stage_buf = PyMem_Malloc(STAGE_BYTES); /* untouched pages are not resident: costs nothing until used */
    uint8_t **bufs[] = {&e->rbuf, &e->plain, &e->plain2, &e->sealed, &e->inner, &e->joined, &e->run, &e->tap_run};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) *bufs[i] = PyMem_Malloc(BUF);
    if (!e->links || !e->flows || !e->up_last || !e->stage_buf || !e->rbuf || !e->plain || !e->plain2 || !e->sealed || !e->inner || !e->joined ||
        !e->run || !e->tap_run) {
        PyErr_NoMemory();
        return -1;
    }
    if (first == Py_None) {
        if (!(e->share = PyMem_Calloc(1, sizeof(LaneShare)))) {
            PyErr_NoMemory();
            return -1;
        }
    } else {
        Py_INCREF(first);
        e->first = first;
        e->share = ((Engine *)first)->share;
    }
    int n = atomic_load(&e->share->n);
    atomic_store(&e->share->n, n > lane + 1 ? n : lane + 1);
    e->message_id = (uint32_t)now_ns() & 0xFFFFFFu; /* next_message_id */
    return 0;
}

static PyObject *Engine_start(Engine *e, PyObject *unused) {
    if (e->running || !e->links) {
        PyErr_SetString(PyExc_RuntimeError, e->running ? "the Engine runs already" : "the Engine was not set up");
        return NULL;
    }
    e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->stop_fd < 0 || e->wake_fd < 0 || e->epfd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    int fds[5] = {e->stop_fd, e->wake_fd, e->tap, e->udp, e->xudp};
    for (int i = 0; i < 5; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        if (fds[i] >= 0 && epoll_ctl(e->epfd, EPOLL_CTL_ADD, fds[i], &ev) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    }
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    if (rc) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    e->running = 1;
    Py_RETURN_NONE;
}

static void engine_stop(Engine *e) {
    if (e->running) {
        uint64_t one = 1;
        if (write(e->stop_fd, &one, sizeof one) < 0) { /* an eventfd write cannot fail here */
        }
        Py_BEGIN_ALLOW_THREADS pthread_join(e->thread, NULL);
        Py_END_ALLOW_THREADS e->running = 0;
    }
    if (e->stop_fd >= 0) close(e->stop_fd);
    if (e->wake_fd >= 0) close(e->wake_fd);
    if (e->epfd >= 0) close(e->epfd);
    e->stop_fd = e->wake_fd = e->epfd = -1;
}

static PyObject *Engine_stop(Engine *e, PyObject *unused) {
    engine_stop(e);
    Py_RETURN_NONE;
}

static void lock_tab(Engine *e) {
    if (pthread_mutex_trylock(&e->tab) == 0) return;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&e->tab);
    Py_END_ALLOW_THREADS
}

static int parse_addr(PyObject *endpoint, Addr *out, int chunk_max) {
    /* endpoint: (family 4 or 6, packed address, port[, chunk size on the path; the Engine's `chunk` if left out]) */
    int family, port, chunk = chunk_max;
    Py_buffer packed;
    if (!PyArg_ParseTuple(endpoint, "iy*i|i", &family, &packed, &port, &chunk)) return -1;
    if (chunk <= CHUNK_HDR || chunk > chunk_max) {
        PyBuffer_Release(&packed);
        PyErr_Format(PyExc_ValueError, "a path's chunk size must be above %d and at most %d", CHUNK_HDR, chunk_max);
        return -1;
    }
    memset(out, 0, sizeof *out);
    out->chunk = chunk;
    int ok = 0;
    if (family == 4 && packed.len == 4) {
        struct sockaddr_in *s = (void *)&out->sa;
        s->sin_family = AF_INET;
        s->sin_port = htons((uint16_t)port);
        memcpy(&s->sin_addr, packed.buf, 4);
        out->len = sizeof *s;
        ok = 1;
    } else if (family == 6 && packed.len == 16) {
        struct sockaddr_in6 *s = (void *)&out->sa;
        s->sin6_family = AF_INET6;
        s->sin6_port = htons((uint16_t)port);
        memcpy(&s->sin6_addr, packed.buf, 16);
        out->len = sizeof *s;
        ok = 1;
    }
    PyBuffer_Release(&packed);
    if (!ok) PyErr_SetString(PyExc_ValueError, "endpoint must be (4, 4 bytes, port) or (6, 16 bytes, port)");
    return ok ? 0 : -1;
}

/* set_link(peer, keys, local_index, remote_index, endpoint or None, relay, big_ok, source or -1, tunnel_ok,
 *          previous, next, lanes_ok) */
static PyObject *Engine_set_link(Engine *e, PyObject *args) {
    unsigned long long peer, relay;
    PyObject *keys, *endpoint, *previous = Py_None, *prev_keys = NULL, *next = Py_None, *next_keys = NULL;
    unsigned int local, remote, prev_local = 0, next_local = 0;
    int big_ok, tunnel_ok = 0, lanes_ok = 0;
    long long source;
    if (!e->links) {
        PyErr_SetString(PyExc_RuntimeError, "the Engine was not set up");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "KO!IIOKpL|pOOp", &peer, &KeysType, &keys, &local, &remote, &endpoint, &relay,
                          &big_ok, &source, &tunnel_ok, &previous, &next, &lanes_ok))
        return NULL;
    if (!keys_ready((Keys *)keys)) return NULL;
    if (previous != Py_None) {
        if (!PyArg_ParseTuple(previous, "O!I;previous is None or (Keys, local index)", &KeysType, &prev_keys,
                              &prev_local))
            return NULL;
        if (!keys_ready((Keys *)prev_keys)) return NULL;
        if (prev_local == local) {
            PyErr_SetString(PyExc_ValueError, "the previous session has the current one's index");
            return NULL;
        }
    }
    if (next != Py_None) {
        if (!PyArg_ParseTuple(next, "O!I;next is None or (Keys, local index)", &KeysType, &next_keys, &next_local))
            return NULL;
        if (!keys_ready((Keys *)next_keys)) return NULL;
        if (next_local == local || (prev_keys && next_local == prev_local)) {
            PyErr_SetString(PyExc_ValueError, "the next session has the index of another");
            return NULL;
        }
    }
    Addr ep = {0};
    int direct = endpoint != Py_None;
    if (direct && parse_addr(endpoint, &ep, e->chunk) < 0) return NULL;
    Py_INCREF(keys);
    Py_XINCREF(prev_keys);
    Py_XINCREF(next_keys);
    PyObject *old = NULL, *old_prev = NULL, *old_next = NULL;
    lock_tab(e);
    FLink *L = link_by_peer(e, peer);
    if (!L && e->nlinks < MAX_LINKS) {
        L = &e->links[e->nlinks++];
        memset(L, 0, sizeof *L);
        L->peer = peer;
    }
    if (L) {
        old = (PyObject *)L->keys;
        old_prev = (PyObject *)L->prev_keys;
        old_next = (PyObject *)L->next_keys;
        L->keys = (Keys *)keys;
        L->prev_keys = (Keys *)prev_keys;
        L->prev_local = prev_local;
        if ((PyObject *)L->next_keys != next_keys) L->next_used = 0;
        L->next_keys = (Keys *)next_keys;
        L->next_local = next_local;
        L->local = local, L->remote = remote, L->direct = direct, L->ep = ep, L->relay = relay;
        L->big_ok = big_ok;
        L->tunnel_ok = tunnel_ok;
        L->lanes_ok = lanes_ok;
        L->has_src = source >= 0;
        L->src = source >= 0 ? (uint32_t)source : 0;
    }
    pthread_mutex_unlock(&e->tab);
    if (!L) {
        Py_DECREF(keys);
        Py_XDECREF(prev_keys);
        Py_XDECREF(next_keys);
        PyErr_SetString(PyExc_OverflowError, "the Engine's link table is full");
        return NULL;
    }
    Py_XDECREF(old);
    Py_XDECREF(old_prev);
    Py_XDECREF(old_next);
    Py_RETURN_NONE;
}

static PyObject *Engine_drop_link(Engine *e, PyObject *arg) {
    unsigned long long peer = PyLong_AsUnsignedLongLong(arg);
    if (peer == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    PyObject *old = NULL, *old_prev = NULL, *old_next = NULL;
    lock_tab(e);
    FLink *L = e->links ? link_by_peer(e, peer) : NULL;
    if (L) {
        old = (PyObject *)L->keys;
        old_prev = (PyObject *)L->prev_keys;
        old_next = (PyObject *)L->next_keys;
        *L = e->links[--e->nlinks];
    }
    pthread_mutex_unlock(&e->tab);
    Py_XDECREF(old);
    Py_XDECREF(old_prev);
    Py_XDECREF(old_next);
    return PyBool_FromLong(L != NULL);
}

static void wake(Engine *e) {
    uint64_t one = 1;
    if (atomic_load(&e->staging) && e->wake_fd >= 0 && write(e->wake_fd, &one, sizeof one) < 0) {
        /* the counter is at its maximum: the thread is woken already */
    }
}

/* An address as Python holds it (DataPath: an int, IPv4 below 2**32, IPv6 above) as a flow's destination. */
static int dst_from(PyObject *address, Dst *dst) {
    if (!PyLong_Check(address)) {
        PyErr_SetString(PyExc_TypeError, "an address is an int");
        return -1;
    }
    PyObject *b = PyObject_CallMethod(address, "to_bytes", "is", 16, "big"); /* OverflowError: negative or too big */
    if (!b) return -1;
    memcpy(dst->b, PyBytes_AS_STRING(b), 16);
    Py_DECREF(b);
    static const uint8_t zero[12];
    if (!memcmp(dst->b, zero, 12)) memcpy(dst->b, v4_mapped, 12);
    return 0;
}

/* set_flow(address, peer, header, ttl seconds, sent[, nat_src, nat_dst]) -> whether the flow is in use at once.
 * `header`: a group's 28-byte routed header, or for a social Engine the DATA byte, with the friend device's
 * view of the addresses the packets leave with (rewrite_head).
 *
 * `sent` is the number of the last frame passed up that Python has sent on (or dropped). If a later frame to
 * an address of this slot went up, it is still on its way through Python, and sending the next frames here
 * would overtake it: the flow starts pending (False), its frames are held in order, and they leave once
 * Python says (Engine_sent) it got that far. Without this, the first packets of a flow arrive after the ones
 * that follow them. */
static PyObject *Engine_set_flow(Engine *e, PyObject *args) {
    unsigned int sent, nat_src = 0, nat_dst = 0;
    unsigned long long peer;
    PyObject *address;
    Py_buffer header;
    double ttl;
    Dst dst;
    if (!e->flows) {
        PyErr_SetString(PyExc_RuntimeError, "the Engine was not set up");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OKy*dI|II", &address, &peer, &header, &ttl, &sent, &nat_src, &nat_dst)) return NULL;
    int social = header.len == 1 && ((uint8_t *)header.buf)[0] == MSG_DATA && nat_src && nat_dst;
    if (e->social ? !social : header.len != ROUTED_LEN || nat_src || nat_dst) {
        PyBuffer_Release(&header);
        PyErr_SetString(PyExc_ValueError, e->social ? "a social flow is the DATA byte and both addresses it leaves with"
                                                    : "a routed header is 28 bytes, and a group's flow rewrites nothing");
        return NULL;
    }
    if (dst_from(address, &dst) < 0) {
        PyBuffer_Release(&header);
        return NULL;
    }
    int64_t now = now_ns();
    lock_tab(e);
    Flow *f = &e->flows[slot_of(&dst)];
    uint32_t last = e->up_last[slot_of(&dst)];
    /* Already pending: stays so, and only the thread (which holds its frames) lets it go. */
    int was_pending = dst_eq(&f->dst, &dst) && f->pending && f->hard >= now;
    int pending = was_pending || (int32_t)(last - sent) > 0;
    if (pending && !was_pending) {
        f->since = now;
        e->c_flow_pending++;
    }
    f->dst = dst;
    f->peer = peer;
    f->hlen = (int)header.len;
    f->nat_src = nat_src;
    f->nat_dst = nat_dst;
    f->expires = now + (int64_t)(ttl * 1e9);
    f->hard = f->expires + (int64_t)(ttl * 1e9);
    f->checking = 0;
    f->pending = pending;
    f->asking = 0;
    f->wait = last;
    memcpy(f->header, header.buf, (size_t)header.len);
    pthread_mutex_unlock(&e->tab);
    PyBuffer_Release(&header);
    wake(e); /* frames held while Python answered leave on it (another lane's Python side calls sent) */
    return PyBool_FromLong(!pending);
}

/* sent(number): Python has sent (or dropped) every frame passed up to this one (see Engine_set_flow). */
static PyObject *Engine_sent(Engine *e, PyObject *arg) {
    unsigned long v = PyLong_AsUnsignedLong(arg);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    atomic_store(&e->py_sent, (unsigned int)v);
    wake(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_drop_flow(Engine *e, PyObject *arg) {
    Dst dst;
    if (dst_from(arg, &dst) < 0) return NULL;
    if (e->flows) {
        lock_tab(e);
        Flow *f = &e->flows[slot_of(&dst)];
        if (dst_eq(&f->dst, &dst)) memset(f, 0, sizeof *f);
        pthread_mutex_unlock(&e->tab);
        wake(e); /* what it held goes up */
    }
    Py_RETURN_NONE;
}

/* Routes changed: every flow is checked again at its next frame (UP_FLOW) and used while Python answers, as at
 * its expiry. Forgetting them instead held or passed up a bulk stream's frames until Python had set its flow
 * again, each time a link or a neighbour list changed; the flows of a link that goes go with it (drop_link).
 * Only slots that hold a flow are written: writing all 4,096 made the whole table resident (~0.45 MB a lane)
 * at a node's first route change. */
static PyObject *Engine_recheck_flows(Engine *e, PyObject *unused) {
    if (e->flows) {
        lock_tab(e);
        for (int i = 0; i < FLOW_SLOTS; i++) {
            if (!e->flows[i].hard) continue;
            e->flows[i].expires = 0;
            e->flows[i].checking = 0;
        }
        pthread_mutex_unlock(&e->tab);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_set_macs(Engine *e, PyObject *args) {
    Py_buffer tap_mac, gateway_mac;
    if (!PyArg_ParseTuple(args, "y*y*", &tap_mac, &gateway_mac)) return NULL;
    int ok = tap_mac.len == 6 && gateway_mac.len == 6;
    if (ok) {
        lock_tab(e);
        memcpy(e->eth, tap_mac.buf, 6);
        memcpy(e->eth + 6, gateway_mac.buf, 6);
        pthread_mutex_unlock(&e->tab);
    }
    PyBuffer_Release(&tap_mac);
    PyBuffer_Release(&gateway_mac);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "MAC addresses are 6 bytes");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* take() -> [(peer, tx bytes, rx bytes, data packets delivered, hops of those, sent, received)] since the last
 * take, for links that did anything; and the note it answers is done. */
static PyObject *Engine_take(Engine *e, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (!out || !e->links) return out;
    atomic_store(&e->note_pending, 0);
    lock_tab(e);
    for (int i = 0; i < e->nlinks; i++) {
        FLink *L = &e->links[i];
        if (!L->tx && !L->rx && !L->tx_seen && !L->rx_seen && !L->next_used) continue;
        PyObject *t = Py_BuildValue("(KKKKKiii)", L->peer, L->tx, L->rx, L->delivered, L->hops, L->tx_seen,
                                    L->rx_seen, L->next_used);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(t);
        L->tx = L->rx = L->delivered = L->hops = 0;
        L->tx_seen = L->rx_seen = L->next_used = 0;
    }
    pthread_mutex_unlock(&e->tab);
    return out;
}

static PyObject *Engine_counters(Engine *e, PyObject *unused) {
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsK}", "frames sent", e->c_frames, "frames passed up",
                         e->c_frames_up, "datagrams handled", e->c_datagrams, "datagrams passed up", e->c_datagrams_up,
                         "relayed", e->c_relayed, "relayed: chunk trains passed on as they came", e->c_relayed_trains,
                         "dropped: Python busy", e->c_up_dropped, "send failed",
                         e->c_send_failed, "TAP errors", e->c_tap_failed, "gso: sent one by one", e->c_gso_fallback,
                         "gso: above the route's MTU", e->c_mtu_refused,
                         "TAP: datagrams written joined", e->c_tap_joined, "TAP: joined write refused",
                         e->c_join_refused, "flows waiting for Python", e->c_flow_pending, "flows asked of Python",
                         e->c_flow_asked, "frames held for order", e->c_staged, "dropped: held frames full",
                         e->c_stage_dropped, "ICMP: unreachable", e->c_unreachable, "chunks: messages rebuilt",
                         e->c_chunks_rebuilt,
                         "chunks: messages dropped (incomplete or inconsistent)", e->c_chunks_dropped,
                         "TCP: connections opened in another lane", e->c_syn_moved,
                         "TCP: segments sent in their connection's lane, read by another", e->c_conn_moved,
                         "UDP and pings: flows started in another lane", e->c_flow_started,
                         "UDP and pings: packets sent in their flow's lane, read by another", e->c_flow_moved,
                         "polls after our own data", e->c_polls,
                         "polls skipped (the waits were long)", e->c_polls_skipped,
                         "express: datagrams sent", e->c_express_sent, "express: datagrams read", e->c_express_read);
}

static void Engine_dealloc(Engine *e) {
    engine_stop(e);
    if (e->links) {
        for (int i = 0; i < e->nlinks; i++) {
            Py_XDECREF((PyObject *)e->links[i].keys);
            Py_XDECREF((PyObject *)e->links[i].prev_keys);
            Py_XDECREF((PyObject *)e->links[i].next_keys);
        }
        PyMem_Free(e->links);
    }
    PyMem_Free(e->flows);
    PyMem_Free(e->up_last);
    PyMem_Free(e->stage_buf);
    uint8_t *bufs[] = {e->rbuf, e->plain, e->plain2, e->sealed, e->inner, e->joined, e->run, e->tap_run};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) PyMem_Free(bufs[i]);
    for (int i = 0; i < PENDING_SLOTS; i++) free(e->pending[i].buf);
    pthread_mutex_destroy(&e->tab);
    if (e->first) Py_DECREF(e->first); /* after this Engine's thread stopped: the share is the first's */
    else PyMem_Free(e->share);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_get_links(Engine *e, void *closure) { return PyLong_FromLong(e->nlinks); }
static PyObject *Engine_get_slice(Engine *e, void *closure) { return PyLong_FromUnsignedLongLong(e->slice_ns); }

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "start the thread"},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, "stop the thread and wait for it"},
    {"set_link", (PyCFunction)Engine_set_link, METH_VARARGS,
     "set_link(peer, keys, local_index, remote_index, endpoint|None, relay, big_ok, source|-1)"},
    {"drop_link", (PyCFunction)Engine_drop_link, METH_O, "drop_link(peer) -> whether it was there"},
    {"set_flow", (PyCFunction)Engine_set_flow, METH_VARARGS, "set_flow(address, peer, routed_header, ttl, sent) -> bool"},
    {"sent", (PyCFunction)Engine_sent, METH_O, "sent(number): Python sent every frame passed up to this one"},
    {"drop_flow", (PyCFunction)Engine_drop_flow, METH_O, "drop_flow(address): forget its flow"},
    {"recheck_flows", (PyCFunction)Engine_recheck_flows, METH_NOARGS, "check every flow again at its next frame"},
    {"set_macs", (PyCFunction)Engine_set_macs, METH_VARARGS, "set_macs(tap_mac, gateway_mac)"},
    {"take", (PyCFunction)Engine_take, METH_NOARGS, "per-link activity since the last take"},
    {"counters", (PyCFunction)Engine_counters, METH_NOARGS, "what the thread did"},
    {NULL}};

static PyGetSetDef Engine_getset[] = {
    {"links", (getter)Engine_get_links, NULL, "links in the table", NULL},
    {"slice_ns", (getter)Engine_get_slice, NULL, "the thread's scheduler slice, 0: the kernel's own (engine_main)", NULL},
    {NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "overlay._fast.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The data path of established links on a thread of its own (overlay/fastpath.py drives it).",
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "overlay._fast",
                                    "The compiled data path: link session keys and the packet engine.", -1,
                                    module_methods};

/* The AES-GCM implementations that can run here, the one in use first. */
static PyObject *gcm_impls(void) {
    if (!gcm_available(GCM_IPSEC_MB)) return Py_BuildValue("(s)", "openssl");
    return gcm_default == GCM_IPSEC_MB ? Py_BuildValue("(ss)", "ipsec-mb", "openssl")
                                       : Py_BuildValue("(ss)", "openssl", "ipsec-mb");
}

PyMODINIT_FUNC PyInit__fast(void) {
    if (PyType_Ready(&KeysType) < 0 || PyType_Ready(&EngineType) < 0) return NULL;
    gcm_setup();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Replayed = PyErr_NewException("overlay._fast.Replayed", PyExc_ValueError, NULL);
    Forged = PyErr_NewException("overlay._fast.Forged", PyExc_ValueError, NULL);
    Exhausted = PyErr_NewException("overlay._fast.Exhausted", PyExc_OverflowError, NULL);
    Py_INCREF(&KeysType);
    Py_INCREF(&EngineType);
    if (!Replayed || !Forged || !Exhausted || PyModule_AddObject(m, "Keys", (PyObject *)&KeysType) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "Replayed", Replayed) < 0 || PyModule_AddObject(m, "Forged", Forged) < 0 ||
        PyModule_AddObject(m, "Exhausted", Exhausted) < 0 ||
        PyModule_AddIntConstant(m, "REPLAY_WINDOW", REPLAY_WINDOW) < 0 ||
        PyModule_AddIntConstant(m, "LANES", LANES) < 0 ||
        PyModule_AddIntConstant(m, "EXPRESS_LANES", EXPRESS_LANE) < 0 ||
        PyModule_AddIntConstant(m, "UP_HEADER", UP_HDR) < 0 || PyModule_AddStringConstant(m, "GCM", gcm_name) < 0 ||
        PyModule_AddObject(m, "GCM_IMPLS", gcm_impls()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
