/* overlay._fast: the Engine type: set-up, start and stop, what it carried (take) and its counters. Included
 * once, by overlay/_fast.c, after _tables.h. */
#ifndef OVERLAY_FAST_ENGINE_TYPE_H
#define OVERLAY_FAST_ENGINE_TYPE_H

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

#endif
