/* The physical floor of a warm /load on this machine (bench/bench_load_socket.py builds it).
 *
 *     load_floor RECORDS KEY_HEX FD [RECORDS_PER_READ [SEND_SIZE [SNDBUF]]]
 *
 * What /load does, in C with nothing else: pread RECORDS_PER_READ (16) AES-256-GCM records of
 * 64 KiB + 16-byte tag (nonce: the record's index, 12 bytes big-endian) from the page-cached
 * file RECORDS into one buffer, decrypt each with its tag checked (EVP) into one plaintext
 * buffer, send that plaintext with send() on the connected socket FD (a Unix socket or TCP
 * loopback, already connected to the discarding reader). The reader writes one byte once it
 * is ready; the clock starts when it arrives and stops when the reader has read everything
 * and closed its end. Prints "WALL_SECONDS CPU_SECONDS" (CPU: this process, user + system).
 * KEY_HEX "none": no AES, the same bytes sent straight from the read buffer (the path alone).
 * SEND_SIZE: bytes per send() (default: a whole read's plaintext); SNDBUF: SO_SNDBUF to ask.
 */
#define _GNU_SOURCE
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#define CHUNK 65536
#define TAG 16
#define RECORD (CHUNK + TAG)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
           u.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "load_floor: %s\n", what);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 4) die("usage: load_floor RECORDS KEY_HEX FD [RECORDS_PER_READ]");
    int per_read = argc > 4 ? atoi(argv[4]) : 16;
    size_t send_size = argc > 5 ? (size_t)atol(argv[5]) : (size_t)per_read * CHUNK;
    int sndbuf = argc > 6 ? atoi(argv[6]) : 0;
    unsigned char key[32];
    int decrypt = strcmp(argv[2], "none") != 0;  /* "none": the path without the AES */
    if (decrypt && strlen(argv[2]) != 64) die("the key must be 64 hex digits");
    for (int i = 0; decrypt && i < 32; i++) sscanf(argv[2] + 2 * i, "%2hhx", &key[i]);
    int file = open(argv[1], O_RDONLY);
    if (file < 0) die("cannot open the records");
    int sock = atoi(argv[3]);
    if (sndbuf > 0 && setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf) != 0)
        die("SO_SNDBUF");
    unsigned char *in = malloc((size_t)per_read * RECORD);
    unsigned char *out = malloc((size_t)per_read * CHUNK);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!in || !out || !ctx) die("out of memory");
    if (!EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL)) die("EVP init");
    char ready;
    if (recv(sock, &ready, 1, 0) != 1) die("the reader did not start");
    double wall = now(), cpu0 = cpu();
    off_t offset = 0;
    unsigned long long index = 0;
    for (;;) {
        ssize_t got = pread(file, in, (size_t)per_read * RECORD, offset);
        if (got < 0) die("pread");
        if (got == 0) break;
        offset += got;
        size_t plain = 0;
        for (ssize_t at = 0; at + RECORD <= got; at += RECORD, index++) {
            unsigned char nonce[12] = {0};
            for (int b = 0; b < 8; b++) nonce[11 - b] = (unsigned char)(index >> (8 * b));
            int len, fin;
            if (!decrypt) {  /* the path alone: as many bytes, sent from the read buffer */
                plain += CHUNK;
                continue;
            }
            if (!EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce)) die("EVP iv");
            if (!EVP_DecryptUpdate(ctx, out + plain, &len, in + at, CHUNK)) die("EVP update");
            if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, in + at + CHUNK))
                die("EVP tag");
            if (EVP_DecryptFinal_ex(ctx, out + plain + len, &fin) <= 0)
                die("a record failed authentication");
            plain += CHUNK;
        }
        const unsigned char *plaintext = decrypt ? out : in;
        for (size_t sent = 0; sent < plain;) {
            size_t piece = plain - sent < send_size ? plain - sent : send_size;
            ssize_t n = send(sock, plaintext + sent, piece, MSG_NOSIGNAL);
            if (n < 0) die("send");
            sent += (size_t)n;
        }
    }
    shutdown(sock, SHUT_WR);
    double cpu_used = cpu() - cpu0;
    while (recv(sock, &ready, 1, 0) > 0) {
    }
    printf("%.6f %.6f\n", now() - wall, cpu_used);
    return 0;
}
