/* overlay/_gcm.h: AES-256-GCM for overlay/_fast.c, on one of two implementations of the same cipher.
 *
 * OpenSSL's libcrypto is always there. Intel's ipsec-mb library (Debian's libipsec-mb, amd64), when the module
 * was built with it, takes over on a CPU where it runs its AVX2 or AVX-512 code. Without OpenSSL 3.0's provider
 * dispatch a call costs a fraction of OpenSSL's on small packets (64 bytes: 55 against 187 ns), and with VAES
 * and VPCLMULQDQ its AVX-512 code runs 2.4x OpenSSL 3.0's speed on a super-frame (10.8 against 4.6 GB/s;
 * AVX2: 4.9). Measured 2026-12-04 on the lab machine, seal of one packet in a C loop (docs/datapath.md, "The
 * cipher"; bench/gcm.py compares the two through Keys). The bytes on the wire are the same whichever is used,
 * so nodes on either interoperate (tests/test_gcm.py).
 * IPOP_OVERLAY_GCM=openssl in the environment keeps libcrypto and leaves the library unset (to compare, to rule
 * it out, or to save the memory its set-up maps); =ipsec-mb-avx2 runs the library's AVX2 code where it would
 * run its AVX-512 code (what a CPU without AVX-512 runs, tested here).
 *
 * A Gcm is one direction's key. The caller serialises its use (Keys' locks); the functions themselves share no
 * state between threads but the read-only key schedule and the library's table of functions.
 */
#ifndef OVERLAY_GCM_H
#define OVERLAY_GCM_H

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
#include <openssl/core_names.h>
#include <openssl/params.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#ifdef HAVE_IPSEC_MB
#include <dlfcn.h>
#include <intel-ipsec-mb.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#define GCM_TAG 16

typedef enum { GCM_OPENSSL = 0, GCM_IPSEC_MB = 1 } gcm_impl;

typedef struct {
    EVP_CIPHER_CTX *evp;
#ifdef HAVE_IPSEC_MB
    struct gcm_key_data *imb; /* 64-byte aligned, as the library's AVX-512 code loads it */
#endif
} Gcm;

#ifdef HAVE_IPSEC_MB
static IMB_MGR *gcm_imb; /* the library's functions for this CPU; NULL: not usable here */
#endif
static gcm_impl gcm_default = GCM_OPENSSL;
static char gcm_name[96] = "OpenSSL";

#ifdef HAVE_IPSEC_MB
/* The library's set-up (init_mb_mgr_auto, the public way to its AVX-512 GCM) runs through set-up code for every
 * algorithm it has, spread over its 12 MB of code, and leaves ~3.1 MiB of it mapped in the process (measured:
 * 132 kB after loading, 3.4 MiB after set-up, /proc/self/smaps). The node never runs that code again. So it lets
 * go of its mappings of the library's code: MADV_DONTNEED on the segments that are executable and never
 * written (private file mappings: the pages it runs later are mapped again from the page cache on first use).
 * Data segments are left alone (dropping them would lose their contents). */
static int gcm_release_segment(struct dl_phdr_info *info, size_t size, void *base) {
    if ((void *)info->dlpi_addr != base) return 0;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X) || (ph->p_flags & PF_W)) continue;
        uintptr_t start = (info->dlpi_addr + ph->p_vaddr) & ~(page - 1);
        uintptr_t end = (info->dlpi_addr + ph->p_vaddr + ph->p_memsz + page - 1) & ~(page - 1);
        madvise((void *)start, end - start, MADV_DONTNEED);
    }
    return 1;
}

static void gcm_release_setup_code(void) {
    Dl_info where;
    if (dladdr((void *)init_mb_mgr_auto, &where) && where.dli_fbase) dl_iterate_phdr(gcm_release_segment, where.dli_fbase);
}
#endif

/* Decide once, at import: ipsec-mb where it has its AVX2 or AVX-512 code, unless the environment says openssl.
 * Its SSE code and its code for CPUs without AES-NI were not measured: OpenSSL keeps those. */
static void gcm_setup(void) {
    snprintf(gcm_name, sizeof gcm_name, "%s", OpenSSL_version(OPENSSL_VERSION));
#ifdef HAVE_IPSEC_MB
    const char *env = getenv("IPOP_OVERLAY_GCM");
    if (env && !strcmp(env, "openssl")) return; /* nor set the library up: its set-up maps ~3.4 MiB of its code */
    IMB_ARCH arch = IMB_ARCH_AVX2;
    IMB_MGR *mgr = alloc_mb_mgr(0);
    if (!mgr) return;
    /* "ipsec-mb-avx2": its AVX2 code even where it has AVX-512, to compare or to test the code an AVX2 CPU runs. */
    if (env && !strcmp(env, "ipsec-mb-avx2") && (mgr->features & IMB_FEATURE_AVX2)) init_mb_mgr_avx2(mgr);
    else init_mb_mgr_auto(mgr, &arch);
    gcm_release_setup_code();
    if (imb_get_errno(mgr) != 0 || (arch != IMB_ARCH_AVX2 && arch != IMB_ARCH_AVX512)) {
        free_mb_mgr(mgr);
        return;
    }
    gcm_imb = mgr;
    gcm_default = GCM_IPSEC_MB;
    int vaes = arch == IMB_ARCH_AVX512 && (mgr->features & IMB_FEATURE_VAES) && (mgr->features & IMB_FEATURE_VPCLMULQDQ);
    snprintf(gcm_name, sizeof gcm_name, "ipsec-mb %s (%s)", imb_get_version_str(),
             arch == IMB_ARCH_AVX2 ? "AVX2" : vaes ? "AVX-512, VAES" : "AVX-512");
#endif
}

/* Whether `impl` can run here (the module was built with it and the CPU has what it needs). */
static int gcm_available(gcm_impl impl) {
#ifdef HAVE_IPSEC_MB
    if (impl == GCM_IPSEC_MB) return gcm_imb != NULL;
#else
    if (impl == GCM_IPSEC_MB) return 0;
#endif
    return 1;
}

static void gcm_free(Gcm *g) {
    if (g->evp) EVP_CIPHER_CTX_free(g->evp);
    g->evp = NULL;
#ifdef HAVE_IPSEC_MB
    if (g->imb) {
        OPENSSL_cleanse(g->imb, sizeof *g->imb);
        free(g->imb);
    }
    g->imb = NULL;
#endif
}

/* Whether gcm_init set it up. */
static int gcm_ready(const Gcm *g) {
#ifdef HAVE_IPSEC_MB
    if (g->imb) return 1;
#endif
    return g->evp != NULL;
}

/* Whether several threads may seal or open under g at once: ipsec-mb's key schedule is only read, and each
 * call's state is on its stack; an OpenSSL EVP context holds the call's state, so one thread at a time. */
static int gcm_shared(const Gcm *g) {
#ifdef HAVE_IPSEC_MB
    if (g->imb) return 1;
#endif
    (void)g;
    return 0;
}

/* 0, or -1 (no memory, or the library refused). */
static int gcm_init(Gcm *g, gcm_impl impl, const uint8_t key[32], int encrypt) {
    memset(g, 0, sizeof *g);
#ifdef HAVE_IPSEC_MB
    if (impl == GCM_IPSEC_MB) {
        void *mem = NULL;
        if (!gcm_imb || posix_memalign(&mem, 64, sizeof *g->imb)) return -1;
        g->imb = mem;
        IMB_AES256_GCM_PRE(gcm_imb, key, g->imb);
        return 0;
    }
#endif
    g->evp = EVP_CIPHER_CTX_new();
    if (!g->evp) return -1;
    int ok = encrypt ? EVP_EncryptInit_ex(g->evp, EVP_aes_256_gcm(), NULL, key, NULL)
                     : EVP_DecryptInit_ex(g->evp, EVP_aes_256_gcm(), NULL, key, NULL);
    if (ok != 1) {
        gcm_free(g);
        return -1;
    }
    return 0;
}

/* Each EVP call costs 50-100 ns on top of the cipher (OpenSSL 3.0's provider dispatch and its parameter
 * lookups), as much as AES-GCM itself on a 100-byte packet: small pieces are gathered into one buffer and fed in
 * one call, the two parts of the associated data too, and the tag goes through EVP_CIPHER_CTX_get_params and
 * set_params rather than EVP_CIPHER_CTX_ctrl, which builds the same parameters on each call. Measured alone
 * (2026-12-03), a 120-byte seal in two pieces took 825-950 ns in a loop on a loaded host and 614-717 ns this way. */
#define GATHER_MAX 2048
#define AAD_MAX 64

/* The associated data aad, then aad2, as one piece when both are there (ipsec-mb takes one; OpenSSL one call). */
static int gcm_join_aad(const uint8_t **aad, int *aadlen, const uint8_t *aad2, int aad2len, uint8_t joined[AAD_MAX]) {
    if (!aad2len) return 0;
    if (!*aadlen) {
        *aad = aad2, *aadlen = aad2len;
        return 0;
    }
    if (*aadlen + aad2len > AAD_MAX) return -1; /* never: a 13-byte header and a 16-byte tag */
    memcpy(joined, *aad, (size_t)*aadlen);
    memcpy(joined + *aadlen, aad2, (size_t)aad2len);
    *aad = joined, *aadlen += aad2len;
    return 0;
}

static int evp_tag(EVP_CIPHER_CTX *ctx, int get, uint8_t *tag) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    OSSL_PARAM p[2] = {OSSL_PARAM_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, GCM_TAG), OSSL_PARAM_END};
    return (get ? EVP_CIPHER_CTX_get_params(ctx, p) : EVP_CIPHER_CTX_set_params(ctx, p)) == 1 ? 0 : -1;
#else
    return EVP_CIPHER_CTX_ctrl(ctx, get ? EVP_CTRL_GCM_GET_TAG : EVP_CTRL_GCM_SET_TAG, GCM_TAG, tag) == 1 ? 0 : -1;
#endif
}

static int evp_seal(EVP_CIPHER_CTX *ctx, const uint8_t nonce[12], const uint8_t *aad, int aadlen,
                    const struct iovec *pieces, int n, uint8_t *out, size_t *outlen) {
    int len;
    size_t total = 0, sum = 0;
    uint8_t gathered[GATHER_MAX];
    struct iovec one;
    for (int i = 0; i < n; i++) sum += pieces[i].iov_len;
    if (n > 1 && sum <= sizeof gathered) {
        for (int i = 0; i < n; i++) {
            memcpy(gathered + total, pieces[i].iov_base, pieces[i].iov_len);
            total += pieces[i].iov_len;
        }
        one = (struct iovec){gathered, total};
        pieces = &one, n = 1, total = 0;
    }
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1) return -1;
    if (aadlen && EVP_EncryptUpdate(ctx, NULL, &len, aad, aadlen) != 1) return -1;
    for (int i = 0; i < n; i++) {
        if (!pieces[i].iov_len) continue;
        if (EVP_EncryptUpdate(ctx, out + total, &len, pieces[i].iov_base, (int)pieces[i].iov_len) != 1) return -1;
        total += (size_t)len;
    }
    if (EVP_EncryptFinal_ex(ctx, out + total, &len) != 1) return -1;
    total += (size_t)len;
    if (evp_tag(ctx, 1, out + total)) return -1;
    *outlen = total + GCM_TAG;
    return 0;
}

static int evp_open(EVP_CIPHER_CTX *ctx, const uint8_t nonce[12], const uint8_t *aad, int aadlen,
                    const struct iovec *ct, int n, const uint8_t *tag, uint8_t *out) {
    int len;
    size_t total = 0;
    uint8_t expected[GCM_TAG];
    memcpy(expected, tag, GCM_TAG); /* set_params takes a writable buffer; the packet's stays untouched */
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1) return -1;
    if (aadlen && EVP_DecryptUpdate(ctx, NULL, &len, aad, aadlen) != 1) return -1;
    for (int i = 0; i < n; i++) {
        if (!ct[i].iov_len) continue;
        if (EVP_DecryptUpdate(ctx, out + total, &len, ct[i].iov_base, (int)ct[i].iov_len) != 1) return -1;
        total += (size_t)len;
    }
    if (evp_tag(ctx, 0, expected)) return -1;
    return EVP_DecryptFinal_ex(ctx, out + total, &len) == 1 ? 0 : -1;
}

/* Seal the concatenation of `n` plaintext pieces under `nonce`, with the associated data aad then aad2 (either
 * may be empty), into out: ciphertext, then the tag. 0, or -1. */
static int gcm_seal_nonce(Gcm *g, const uint8_t nonce[12], const uint8_t *aad, int aadlen, const uint8_t *aad2,
                          int aad2len, const struct iovec *pieces, int n, uint8_t *out, size_t *outlen) {
    uint8_t joined[AAD_MAX];
    if (gcm_join_aad(&aad, &aadlen, aad2, aad2len, joined)) return -1;
#ifdef HAVE_IPSEC_MB
    if (g->imb) {
        struct gcm_context_data cx;
        size_t total = 0;
        IMB_AES256_GCM_INIT(gcm_imb, g->imb, &cx, nonce, aadlen ? aad : joined, (uint64_t)aadlen);
        for (int i = 0; i < n; i++) {
            if (!pieces[i].iov_len) continue;
            IMB_AES256_GCM_ENC_UPDATE(gcm_imb, g->imb, &cx, out + total, pieces[i].iov_base, pieces[i].iov_len);
            total += pieces[i].iov_len;
        }
        IMB_AES256_GCM_ENC_FINALIZE(gcm_imb, g->imb, &cx, out + total, GCM_TAG);
        *outlen = total + GCM_TAG;
        return 0;
    }
#endif
    return evp_seal(g->evp, nonce, aad, aadlen, pieces, n, out, outlen);
}

/* Open the concatenation of `n` ciphertext pieces with its tag into out (contiguous; it may be a single piece
 * itself): a packet that arrived as chunks is opened where it lies, never joined first. 0, or -1: fails
 * authentication (out then holds bytes nobody may use). */
static int gcm_open_nonce(Gcm *g, const uint8_t nonce[12], const uint8_t *aad, int aadlen, const uint8_t *aad2,
                          int aad2len, const struct iovec *ct, int n, const uint8_t *tag, uint8_t *out) {
    uint8_t joined[AAD_MAX];
    if (gcm_join_aad(&aad, &aadlen, aad2, aad2len, joined)) return -1;
#ifdef HAVE_IPSEC_MB
    if (g->imb) {
        struct gcm_context_data cx;
        uint8_t computed[GCM_TAG];
        size_t total = 0;
        IMB_AES256_GCM_INIT(gcm_imb, g->imb, &cx, nonce, aadlen ? aad : joined, (uint64_t)aadlen);
        for (int i = 0; i < n; i++) {
            if (!ct[i].iov_len) continue;
            IMB_AES256_GCM_DEC_UPDATE(gcm_imb, g->imb, &cx, out + total, ct[i].iov_base, ct[i].iov_len);
            total += ct[i].iov_len;
        }
        IMB_AES256_GCM_DEC_FINALIZE(gcm_imb, g->imb, &cx, computed, GCM_TAG);
        return CRYPTO_memcmp(computed, tag, GCM_TAG) ? -1 : 0;
    }
#endif
    return evp_open(g->evp, nonce, aad, aadlen, ct, n, tag, out);
}

#endif
