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
 *
 * Source: one translation unit, so the compiler sees a packet's whole way at once and inlines across it (a
 * packet's work is a few calls deep: read, route, seal, send), as it did when this was one file; the code is in
 * parts by concern, each included once, below, in the order it needs: _gcm.h (the cipher), _wire.h (formats,
 * bounds), _keys.h (Keys), _engine.h (the Engine's state), _lanes.h, _send.h, _from_tap.h, _to_tap.h,
 * _from_udp.h, _udp_read.h, _thread.h (its loop), _tables.h and _engine_type.h (its Python side). This file
 * holds the module: the handshake's AES-GCM functions, the module's table and its set-up.
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

#include "_wire.h"

static PyObject *Replayed, *Forged, *Exhausted; /* the module's exceptions (PyInit__fast) */

#include "_keys.h"
#include "_engine.h"
#include "_lanes.h"
#include "_send.h"
#include "_from_tap.h"
#include "_to_tap.h"
#include "_from_udp.h"
#include "_udp_read.h"
#include "_thread.h"
#include "_tables.h"
#include "_engine_type.h"

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

static PyMethodDef module_methods[] = {
    {"aesgcm_seal", (PyCFunction)(void (*)(void))aesgcm_seal, METH_VARARGS | METH_KEYWORDS,
     "aesgcm_seal(key, nonce, ad, plaintext, impl=None) -> ciphertext + tag"},
    {"aesgcm_open", (PyCFunction)(void (*)(void))aesgcm_open, METH_VARARGS | METH_KEYWORDS,
     "aesgcm_open(key, nonce, ad, ciphertext + tag, impl=None) -> plaintext; Forged"},
    {"steer_lanes", steer_lanes, METH_VARARGS,
     "steer_lanes(fd, lanes, express=False): the reuseport group of fd gives each datagram to the socket of its "
     "lane (express: lanes + k is the socket of lane k's express datagrams)"},
    {NULL}};

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
