/* overlay._fast: Python's side of the Engine's tables: links, flows and the frames Python sent, the MACs of
 * delivered frames. Included once, by overlay/_fast.c, after _thread.h. */
#ifndef OVERLAY_FAST_TABLES_H
#define OVERLAY_FAST_TABLES_H

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

#endif
