/* overlay._fast's Keys: one link session's AES-256-GCM keys, its send counters and its replay windows, one of each
 * per lane (the counter's top byte). Included once, by overlay/_fast.c, after _wire.h (HDR, TAG, PT_SEALED;
 * the byte helpers be64, put32, put64) and the module's exceptions (Replayed, Forged, Exhausted); the
 * Engine there seals and opens through the static functions below, Python through the type. */
#ifndef OVERLAY_KEYS_H
#define OVERLAY_KEYS_H

#define REPLAY_WINDOW 1024
#define WINDOW_WORDS (REPLAY_WINDOW / 64)
/* Lanes (docs/datapath.md, Lanes): a counter's top byte is its lane, and each lane
 * has its own next counter and replay window, so several Engine threads send and receive on one session
 * without sharing a counter, and a lane's packets are never judged against another lane's newest. Python and a
 * peer that does not take lanes use lane 0 only. */
#define LANES 8
#define LANE_SHIFT 56
#define LANE_MASK ((1ULL << LANE_SHIFT) - 1)
#define MAX_COUNTER (LANE_MASK - (1ULL << 13) - 1) /* within a lane: REJECT_AFTER_MESSAGES, session.py */

typedef struct {
    int64_t top;                 /* the newest accepted within the lane, -1 before any */
    uint64_t bits[WINDOW_WORDS]; /* bit (c % REPLAY_WINDOW): counter c, for c in (top - REPLAY_WINDOW, top] */
} Window;

typedef struct {
    PyObject_HEAD
    Gcm enc, dec;
    pthread_mutex_t send_lock, recv_lock;
    uint64_t next[LANES]; /* the next to send in each lane, without the lane byte */
    Window win[LANES];
} Keys;

static int window_fresh(const Window *w, uint64_t c) {
    if (w->top < 0 || c > (uint64_t)w->top) return 1;
    if ((uint64_t)w->top - c >= REPLAY_WINDOW) return 0;
    return !(w->bits[(c % REPLAY_WINDOW) / 64] >> (c % 64) & 1);
}

static void window_mark(Window *w, uint64_t c) {
    if (w->top < 0 || c > (uint64_t)w->top) {
        uint64_t gap = w->top < 0 ? REPLAY_WINDOW : c - (uint64_t)w->top;
        if (gap >= REPLAY_WINDOW) {
            memset(w->bits, 0, sizeof w->bits);
        } else {
            for (uint64_t x = (uint64_t)w->top + 1; x < c; x++) w->bits[(x % REPLAY_WINDOW) / 64] &= ~(1ULL << (x % 64));
        }
        w->top = (int64_t)c;
    }
    w->bits[(c % REPLAY_WINDOW) / 64] |= 1ULL << (c % 64);
}

/* The window of a full counter's lane, NULL for a lane beyond LANES (never sent by us: refused as too old). */
static Window *window_of(Keys *k, uint64_t c) {
    uint64_t lane = c >> LANE_SHIFT;
    return lane < LANES ? &k->win[lane] : NULL;
}

static int keys_fresh(Keys *k, uint64_t c) {
    Window *w = window_of(k, c);
    return w && window_fresh(w, c & LANE_MASK);
}

static void nonce_of(uint8_t nonce[12], uint64_t counter) {
    memset(nonce, 0, 4);
    put64(nonce + 4, counter);
}

static int gcm_seal(Gcm *g, uint64_t c, const uint8_t *aad, int aadlen, const uint8_t *aad2, int aad2len,
                    const struct iovec *pieces, int n, uint8_t *out, size_t *outlen) {
    uint8_t nonce[12];
    nonce_of(nonce, c);
    return gcm_seal_nonce(g, nonce, aad, aadlen, aad2, aad2len, pieces, n, out, outlen);
}

static int gcm_open(Gcm *g, uint64_t c, const uint8_t *aad, int aadlen, const uint8_t *aad2, int aad2len,
                    const struct iovec *ct, int n, const uint8_t *tag, uint8_t *out) {
    uint8_t nonce[12];
    nonce_of(nonce, c);
    return gcm_open_nonce(g, nonce, aad, aadlen, aad2, aad2len, ct, n, tag, out);
}

/* Seal a packet (header, then the AEAD of the pieces) into out under the lane's next counter; the caller holds
 * no lock. The lock covers the counter, and the cipher only where its context cannot be shared (gcm_shared).
 * aad2: more associated data after the header (a bound packet's tag), or NULL. 0, or -1: exhausted. */
static int keys_seal_aad(Keys *k, int lane, uint8_t ptype, uint32_t remote, const uint8_t *aad2,
                         const struct iovec *pieces, int n, uint8_t *out, size_t *outlen) {
    int shared = gcm_shared(&k->enc);
    pthread_mutex_lock(&k->send_lock);
    uint64_t next = k->next[lane];
    if (next > MAX_COUNTER) {
        pthread_mutex_unlock(&k->send_lock);
        return -1;
    }
    k->next[lane] = next + 1;
    if (shared) pthread_mutex_unlock(&k->send_lock);
    uint64_t c = (uint64_t)lane << LANE_SHIFT | next;
    out[0] = ptype;
    put32(out + 1, remote);
    put64(out + 5, c);
    size_t len;
    int rc = gcm_seal(&k->enc, c, out, HDR, aad2, aad2 ? TAG : 0, pieces, n, out + HDR, &len) ? -2 : 0;
    if (!rc) *outlen = HDR + len;
    if (!shared) pthread_mutex_unlock(&k->send_lock);
    return rc;
}

/* A transport packet of the pieces. */
static int keys_seal(Keys *k, int lane, uint8_t ptype, uint32_t remote, const struct iovec *pieces, int n,
                     uint8_t *out, size_t *outlen) {
    return keys_seal_aad(k, lane, ptype, remote, NULL, pieces, n, out, outlen);
}

/* SEALED and TUNNEL packets: `head` encrypted under the link key, with the last TAG bytes of the packet that
 * follows it (an end-to-end or tunnel packet, authenticated by its own key) as more associated data, so the
 * link never runs a cipher over that packet's bytes. Writes HDR + headlen + TAG bytes to out. */
static int keys_seal_head(Keys *k, int lane, uint8_t ptype, uint32_t remote, const uint8_t *head, size_t headlen,
                          const uint8_t *tail_tag, uint8_t *out) {
    struct iovec piece = {(void *)head, headlen};
    size_t len;
    return keys_seal_aad(k, lane, ptype, remote, tail_tag, &piece, 1, out, &len);
}

/* Accept counter c unless something accepted it meanwhile; the caller holds recv_lock. */
static int mark_locked(Keys *k, uint64_t c) {
    Window *w = window_of(k, c);
    if (!w || !window_fresh(w, c & LANE_MASK)) return 0;
    window_mark(w, c & LANE_MASK);
    return 1;
}

/* Open a packet whose HDR-byte header is at hdr, its ciphertext the n pieces ct and its tag at tag, into out
 * (contiguous). aad2 as for keys_seal_aad. mark: accept the counter in the window now. Where the cipher may run
 * outside the lock (gcm_shared) the window is checked before it and again when marking after it, so two threads
 * that open the same packet at once accept it once.
 * Returns 0, 1 (replayed or too old), 2 (fails authentication). */
static int keys_open_iov(Keys *k, const uint8_t *hdr, const struct iovec *ct, int n, const uint8_t *tag,
                         const uint8_t *aad2, uint8_t *out, int mark) {
    uint64_t c = be64(hdr + 5);
    int rc;
    pthread_mutex_lock(&k->recv_lock);
    if (!keys_fresh(k, c)) {
        pthread_mutex_unlock(&k->recv_lock);
        return 1;
    }
    if (!gcm_shared(&k->dec)) {
        rc = gcm_open(&k->dec, c, hdr, HDR, aad2, aad2 ? TAG : 0, ct, n, tag, out) ? 2 : 0;
        if (!rc && mark && !mark_locked(k, c)) rc = 1;
        pthread_mutex_unlock(&k->recv_lock);
        return rc;
    }
    pthread_mutex_unlock(&k->recv_lock);
    rc = gcm_open(&k->dec, c, hdr, HDR, aad2, aad2 ? TAG : 0, ct, n, tag, out) ? 2 : 0;
    if (!rc && mark) {
        pthread_mutex_lock(&k->recv_lock);
        if (!mark_locked(k, c)) rc = 1;
        pthread_mutex_unlock(&k->recv_lock);
    }
    return rc;
}

/* Open `part` bytes (ciphertext, then its tag) after the header of the packet at p into out (part - TAG bytes). */
static int keys_open_part(Keys *k, const uint8_t *p, size_t part, const uint8_t *aad2, uint8_t *out, int mark) {
    struct iovec ct = {(void *)(p + HDR), part - TAG};
    return keys_open_iov(k, p, &ct, 1, p + HDR + part - TAG, aad2, out, mark);
}

/* A transport packet of len bytes (len - HDR - TAG bytes into out). */
static int keys_open(Keys *k, const uint8_t *pkt, size_t len, uint8_t *out, int mark) {
    return keys_open_part(k, pkt, len - HDR, NULL, out, mark);
}

/* The head (part - TAG bytes) of a SEALED or TUNNEL packet of len bytes, bound to the packet's last TAG bytes. */
static int keys_open_head(Keys *k, const uint8_t *p, size_t len, size_t part, uint8_t *out, int mark) {
    return keys_open_part(k, p, part, p + len - TAG, out, mark);
}

/* Accept counter c (opened earlier with mark=0) unless something accepted it meanwhile. */
static int keys_mark(Keys *k, uint64_t c) {
    pthread_mutex_lock(&k->recv_lock);
    int ok = mark_locked(k, c);
    pthread_mutex_unlock(&k->recv_lock);
    return ok;
}

/* impl=None: the module's choice (GCM); "openssl" or "ipsec-mb": that one, where it can run. -1: error set. */
static int gcm_impl_of(PyObject *name, gcm_impl *impl) {
    *impl = gcm_default;
    if (!name || name == Py_None) return 0;
    const char *s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
    if (!s) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "impl is a str");
        return -1;
    }
    if (!strcmp(s, "openssl")) *impl = GCM_OPENSSL;
    else if (!strcmp(s, "ipsec-mb")) *impl = GCM_IPSEC_MB;
    else {
        PyErr_Format(PyExc_ValueError, "no AES-GCM implementation %R (openssl, ipsec-mb)", name);
        return -1;
    }
    if (!gcm_available(*impl)) {
        PyErr_Format(PyExc_ValueError, "AES-GCM implementation %s cannot run here", s);
        return -1;
    }
    return 0;
}

static int Keys_init(Keys *self, PyObject *args, PyObject *kw) {
    Py_buffer send, recv;
    PyObject *name = NULL;
    gcm_impl impl;
    static char *names[] = {"send_key", "recv_key", "impl", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*|O", names, &send, &recv, &name)) return -1;
    int rc = -1;
    if (send.len != 32 || recv.len != 32) {
        PyErr_SetString(PyExc_ValueError, "AES-256-GCM keys are 32 bytes");
    } else if (gcm_ready(&self->enc)) {
        PyErr_SetString(PyExc_RuntimeError, "Keys are set once");
    } else if (gcm_impl_of(name, &impl) == 0) {
        if (gcm_init(&self->enc, impl, send.buf, 1) || gcm_init(&self->dec, impl, recv.buf, 0)) {
            gcm_free(&self->enc);
            gcm_free(&self->dec);
            PyErr_SetString(PyExc_RuntimeError, "cannot make an AES-256-GCM context");
        } else {
            rc = 0;
        }
    }
    PyBuffer_Release(&send);
    PyBuffer_Release(&recv);
    return rc;
}

static PyObject *Keys_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Keys *self = (Keys *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    pthread_mutex_init(&self->send_lock, NULL);
    pthread_mutex_init(&self->recv_lock, NULL);
    for (int i = 0; i < LANES; i++) self->win[i].top = -1;
    return (PyObject *)self;
}

static void Keys_dealloc(Keys *self) {
    gcm_free(&self->enc);
    gcm_free(&self->dec);
    pthread_mutex_destroy(&self->send_lock);
    pthread_mutex_destroy(&self->recv_lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int keys_ready(Keys *self) {
    if (!gcm_ready(&self->enc)) {
        PyErr_SetString(PyExc_RuntimeError, "Keys were not initialised");
        return 0;
    }
    return 1;
}

/* A PyArg converter ("O&") of a lane number from Python: 0 to LANES - 1. */
static int lane_arg(PyObject *o, void *out) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return 0;
    if (v < 0 || v >= LANES) {
        PyErr_Format(PyExc_ValueError, "lane is 0 to %d", LANES - 1);
        return 0;
    }
    *(int *)out = (int)v;
    return 1;
}

static PyObject *Keys_seal(Keys *self, PyObject *args) {
    unsigned char ptype;
    unsigned int remote;
    int lane = 0;
    Py_buffer plain;
    if (!keys_ready(self) || !PyArg_ParseTuple(args, "bIy*|O&", &ptype, &remote, &plain, lane_arg, &lane)) return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, HDR + plain.len + TAG);
    if (out) {
        struct iovec piece = {plain.buf, (size_t)plain.len};
        size_t len;
        int rc = keys_seal(self, lane, ptype, remote, &piece, 1, (uint8_t *)PyBytes_AS_STRING(out), &len);
        if (rc) {
            Py_CLEAR(out);
            PyErr_SetString(rc == -1 ? Exhausted : PyExc_RuntimeError,
                            rc == -1 ? "session counter exhausted; a new handshake is needed" : "AES-GCM failed");
        }
    }
    PyBuffer_Release(&plain);
    return out;
}

static PyObject *Keys_open(Keys *self, PyObject *args) {
    Py_buffer pkt;
    unsigned long long counter;
    if (!keys_ready(self) || !PyArg_ParseTuple(args, "y*K", &pkt, &counter)) return NULL;
    PyObject *out = NULL;
    if (pkt.len < HDR + TAG || be64((uint8_t *)pkt.buf + 5) != counter) {
        PyErr_SetString(Forged, "transport packet too short or counter not its own");
    } else if ((out = PyBytes_FromStringAndSize(NULL, pkt.len - HDR - TAG))) {
        int rc = keys_open(self, pkt.buf, (size_t)pkt.len, (uint8_t *)PyBytes_AS_STRING(out), 1);
        if (rc) {
            Py_CLEAR(out);
            if (rc == 1) PyErr_Format(Replayed, "replayed or too old packet (counter %llu)", counter);
            else PyErr_SetString(Forged, "transport packet fails authentication");
        }
    }
    PyBuffer_Release(&pkt);
    return out;
}

/* SEALED and TUNNEL packets (keys_seal_head), the packet that follows the head given whole. */
static PyObject *Keys_seal_header(Keys *self, PyObject *args) {
    unsigned int remote;
    Py_buffer header, e2e;
    unsigned char ptype = PT_SEALED;
    int lane = 0;
    if (!keys_ready(self) ||
        !PyArg_ParseTuple(args, "Iy*y*|bO&", &remote, &header, &e2e, &ptype, lane_arg, &lane))
        return NULL;
    PyObject *out = NULL;
    if (e2e.len < TAG) {
        PyErr_SetString(PyExc_ValueError, "end-to-end packet shorter than its tag");
    } else if ((out = PyBytes_FromStringAndSize(NULL, HDR + header.len + TAG + e2e.len))) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *tag = (const uint8_t *)e2e.buf + e2e.len - TAG;
        int rc = keys_seal_head(self, lane, ptype, remote, header.buf, (size_t)header.len, tag, o);
        if (rc) {
            Py_CLEAR(out);
            PyErr_SetString(rc == -1 ? Exhausted : PyExc_RuntimeError,
                            rc == -1 ? "session counter exhausted; a new handshake is needed" : "AES-GCM failed");
        } else {
            memcpy(o + HDR + header.len + TAG, e2e.buf, (size_t)e2e.len);
        }
    }
    PyBuffer_Release(&header);
    PyBuffer_Release(&e2e);
    return out;
}

static PyObject *Keys_open_header(Keys *self, PyObject *args) {
    Py_buffer pkt;
    unsigned long long counter;
    Py_ssize_t part;
    if (!keys_ready(self) || !PyArg_ParseTuple(args, "y*Kn", &pkt, &counter, &part)) return NULL;
    PyObject *out = NULL;
    if (part < TAG || pkt.len < HDR + part + TAG || be64((uint8_t *)pkt.buf + 5) != counter) {
        PyErr_SetString(Forged, "sealed packet too short or counter not its own");
    } else if ((out = PyBytes_FromStringAndSize(NULL, part - TAG))) {
        int rc = keys_open_head(self, pkt.buf, (size_t)pkt.len, (size_t)part, (uint8_t *)PyBytes_AS_STRING(out), 1);
        if (rc) {
            Py_CLEAR(out);
            if (rc == 1) PyErr_Format(Replayed, "replayed or too old packet (counter %llu)", counter);
            else PyErr_SetString(Forged, "sealed packet fails authentication");
        }
    }
    PyBuffer_Release(&pkt);
    return out;
}

static PyObject *Keys_newest(Keys *self, PyObject *arg) {
    unsigned long long c = PyLong_AsUnsignedLongLong(arg);
    if (c == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&self->recv_lock);
    Window *w = window_of(self, c);
    int newest = w && w->top >= 0 && (c & LANE_MASK) >= (uint64_t)w->top;
    pthread_mutex_unlock(&self->recv_lock);
    return PyBool_FromLong(newest);
}

static PyObject *Keys_get_counter(Keys *self, void *closure) {
    pthread_mutex_lock(&self->send_lock);
    uint64_t c = self->next[0];
    pthread_mutex_unlock(&self->send_lock);
    return PyLong_FromUnsignedLongLong(c);
}

static int Keys_set_counter(Keys *self, PyObject *value, void *closure) {
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "counter cannot be deleted");
        return -1;
    }
    unsigned long long c = PyLong_AsUnsignedLongLong(value);
    if (c == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (c > LANE_MASK) {
        PyErr_SetString(PyExc_ValueError, "a counter within a lane is below 2**56");
        return -1;
    }
    pthread_mutex_lock(&self->send_lock);
    self->next[0] = c;
    pthread_mutex_unlock(&self->send_lock);
    return 0;
}

static PyObject *Keys_get_highest(Keys *self, void *closure) {
    uint64_t most = 0;
    pthread_mutex_lock(&self->send_lock);
    for (int i = 0; i < LANES; i++) most = self->next[i] > most ? self->next[i] : most;
    pthread_mutex_unlock(&self->send_lock);
    return PyLong_FromUnsignedLongLong(most);
}

static PyObject *Keys_get_top(Keys *self, void *closure) {
    pthread_mutex_lock(&self->recv_lock);
    int64_t top = self->win[0].top;
    pthread_mutex_unlock(&self->recv_lock);
    return PyLong_FromLongLong(top);
}

static PyMethodDef Keys_methods[] = {
    {"seal", (PyCFunction)Keys_seal, METH_VARARGS, "seal(type, remote_index, plaintext, lane=0) -> transport packet"},
    {"open", (PyCFunction)Keys_open, METH_VARARGS, "open(packet, counter) -> plaintext; Replayed or Forged"},
    {"seal_header", (PyCFunction)Keys_seal_header, METH_VARARGS,
     "seal_header(remote_index, header, packet, type=SEALED, lane=0) -> SEALED or TUNNEL packet"},
    {"open_header", (PyCFunction)Keys_open_header, METH_VARARGS,
     "open_header(packet, counter, part) -> routed header; Replayed or Forged"},
    {"newest", (PyCFunction)Keys_newest, METH_O, "whether counter is the newest accepted"},
    {NULL}};

static PyGetSetDef Keys_getset[] = {
    {"counter", (getter)Keys_get_counter, (setter)Keys_set_counter, "the next counter to send in lane 0", NULL},
    {"highest", (getter)Keys_get_highest, NULL, "the most packets sent in any one lane", NULL},
    {"top", (getter)Keys_get_top, NULL, "the newest counter accepted in lane 0, -1 before any", NULL},
    {NULL}};

static PyTypeObject KeysType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "overlay._fast.Keys",
    .tp_basicsize = sizeof(Keys),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One link session's AES-256-GCM keys, send counter and replay window.",
    .tp_new = Keys_new,
    .tp_init = (initproc)Keys_init,
    .tp_dealloc = (destructor)Keys_dealloc,
    .tp_methods = Keys_methods,
    .tp_getset = Keys_getset,
};

#endif
