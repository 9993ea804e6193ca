/* The kernel's crc32c(seed, data): the reflected CRC with polynomial 0x82F63B78, no
 * inversion on input or output. Shared by the C extensions that checksum metadata
 * (_kernelhash.c, ext4/_ext4meta.c): each includes it, and calls crc32c_init() once when
 * its module loads, before any crc32c_update().
 *
 * x86-64 CPUs with SSE4.2 have the instruction; elsewhere a table, eight bytes a step.
 */
#ifndef VMIMG_CRC32C_H
#define VMIMG_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define POLY 0x82F63B78u /* Castagnoli, bit-reflected */
#define SLICES 8

static uint32_t table[SLICES][256];

static void make_tables(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int s = 1; s < SLICES; s++)
            table[s][n] = (table[s - 1][n] >> 8) ^ table[0][table[s - 1][n] & 0xff];
}

static uint32_t crc_table(uint32_t crc, const unsigned char *p, size_t len) {
    while (len >= SLICES) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4); /* little-endian layout assumed below: fixed up on big-endian */
        memcpy(&hi, p + 4, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        lo = __builtin_bswap32(lo);
        hi = __builtin_bswap32(hi);
#endif
        lo ^= crc;
        crc = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^
              table[4][lo >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
              table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
        p += SLICES;
        len -= SLICES;
    }
    while (len--)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_SSE42_PATH 1
__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t crc, const unsigned char *p,
                                                             size_t len) {
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        len -= 8;
    }
    crc = (uint32_t)c;
    while (len--)
        crc = __builtin_ia32_crc32qi(crc, *p++);
    return crc;
}
#endif

static int use_sse42;

static void crc32c_init(void) {
    make_tables();
#ifdef HAVE_SSE42_PATH
    /* VMIMG_CRC32C_TABLE=1 forces the table, so that the tests check both ways. */
    const char *force = getenv("VMIMG_CRC32C_TABLE");
    use_sse42 = __builtin_cpu_supports("sse4.2") && !(force && force[0] == '1');
#endif
}

static uint32_t crc32c_update(uint32_t crc, const unsigned char *p, size_t len) {
#ifdef HAVE_SSE42_PATH
    if (use_sse42)
        return crc_sse42(crc, p, len);
#endif
    return crc_table(crc, p, len);
}

#endif /* VMIMG_CRC32C_H */
