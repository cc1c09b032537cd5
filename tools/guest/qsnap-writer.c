/*
 * qsnap-writer FILE [interval_ms=10] [sync_every=1]
 *
 * Appends fixed-size, self-checking records to FILE until SIGTERM, so a host-side test
 * can prove that a point-in-time image holds a clean prefix of what the guest wrote and
 * can measure write stalls with nanosecond timestamps (busybox date has 1 s resolution).
 *
 * Record (64 bytes, little endian), parsed by tests/bed/records.py:
 *   0  char[8] magic "QSNAPREC"
 *   8  u64     seq (0, 1, 2, ...; continues after the last valid record of FILE)
 *   16 u64     CLOCK_REALTIME ns, taken just before the write
 *   24 u32     writer pid
 *   28 u32     interval_ms
 *   32 u8[28]  filler (0xA5)
 *   60 u32     CRC-32 (zlib polynomial) of bytes 0..59
 * Each record is written with one write(); fsync every sync_every records and on exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE 64
#define CRC_OFF 60

static volatile sig_atomic_t stop_requested;
static uint32_t crc_table[256];

static void on_term(int sig) { (void)sig; stop_requested = 1; }

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32(const unsigned char *p, size_t len) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint32_t get_u32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static int record_valid(const unsigned char *r) {
    return memcmp(r, "QSNAPREC", 8) == 0 && get_u32(r + CRC_OFF) == crc32(r, CRC_OFF);
}

static int all_zero(const unsigned char *r) {
    for (int i = 0; i < REC_SIZE; i++)
        if (r[i]) return 0;
    return 1;
}

/* Resume after the last valid record: drop a torn or zero-filled tail (a crash leaves
 * one) so start/stop/start still yields one contiguous log. Returns the next seq. */
static int64_t resume(int fd) {
    struct stat st;
    unsigned char r[REC_SIZE];
    if (fstat(fd, &st) != 0) return -1;
    off_t end = st.st_size - st.st_size % REC_SIZE;
    while (end > 0) {
        if (pread(fd, r, REC_SIZE, end - REC_SIZE) != REC_SIZE) return -1;
        if (!all_zero(r)) break;
        end -= REC_SIZE;
    }
    if (ftruncate(fd, end) != 0) return -1;
    if (end == 0) return 0;
    if (!record_valid(r)) {
        fprintf(stderr, "qsnap-writer: last record is corrupt, refusing to append\n");
        return -1;
    }
    return (int64_t)get_u64(r + 8) + 1;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: qsnap-writer FILE [interval_ms=10] [sync_every=1]\n");
        return 2;
    }
    long interval_ms = argc > 2 ? strtol(argv[2], NULL, 10) : 10;
    long sync_every = argc > 3 ? strtol(argv[3], NULL, 10) : 1;
    if (interval_ms < 0 || sync_every < 1) {
        fprintf(stderr, "qsnap-writer: bad interval_ms or sync_every\n");
        return 2;
    }
    crc_init();

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fd = open(argv[1], O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) { perror("qsnap-writer: open"); return 1; }
    int64_t next = resume(fd);
    if (next < 0) return 1;
    if (lseek(fd, 0, SEEK_END) < 0) { perror("qsnap-writer: lseek"); return 1; }

    unsigned char r[REC_SIZE];
    memset(r, 0xA5, sizeof r);
    memcpy(r, "QSNAPREC", 8);
    put_u32(r + 24, (uint32_t)getpid());
    put_u32(r + 28, (uint32_t)interval_ms);
    struct timespec pause = { interval_ms / 1000, (interval_ms % 1000) * 1000000L };
    uint64_t seq = (uint64_t)next;
    long unsynced = 0;

    while (!stop_requested) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        put_u64(r + 8, seq);
        put_u64(r + 16, (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec);
        put_u32(r + CRC_OFF, crc32(r, CRC_OFF));
        ssize_t n;
        do n = write(fd, r, REC_SIZE); while (n < 0 && errno == EINTR);
        if (n != REC_SIZE) { perror("qsnap-writer: write"); return 1; }
        seq++;
        if (++unsynced >= sync_every) {
            if (fsync(fd) != 0 && errno != EINTR) { perror("qsnap-writer: fsync"); return 1; }
            unsynced = 0;
        }
        if (interval_ms > 0 && !stop_requested) {
            struct timespec rem = pause;
            while (clock_nanosleep(CLOCK_MONOTONIC, 0, &rem, &rem) == EINTR && !stop_requested) {
            }
        }
    }
    if (fsync(fd) != 0) { perror("qsnap-writer: fsync"); return 1; }
    close(fd);
    return 0;
}
