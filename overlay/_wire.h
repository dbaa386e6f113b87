/* overlay._fast: what the wire and the TAP look like (overlay/wire.py, overlay/transport/chunks.py,
 * overlay/tap/frames.py), the Engine's bounds, byte helpers and the clock. Included once, by overlay/_fast.c,
 * first of its parts. */
#ifndef OVERLAY_FAST_WIRE_H
#define OVERLAY_FAST_WIRE_H

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

#endif
