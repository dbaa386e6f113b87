/* overlay._fast: the Engine's thread: its loop, the poll after its own data and the scheduler slice it asks
 * for. Included once, by overlay/_fast.c, after _udp_read.h. */
#ifndef OVERLAY_FAST_THREAD_H
#define OVERLAY_FAST_THREAD_H

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

/* A poll window after a wait of `waited` for the next event (above): kept, halved or doubled. */
static int64_t adapt_window(int64_t w, int64_t waited) {
    if (waited > SPIN_NS) return w / 2 < POLL_MIN ? 0 : w / 2;
    if (waited <= w) return w;
    if (w * 2 < POLL_START) return POLL_START;
    return w * 2 > SPIN_NS ? SPIN_NS : w * 2;
}

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
            window[wait_kind] = adapt_window(window[wait_kind], now_ns() - wait_from);
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

#endif
