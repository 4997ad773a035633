/* sim: a stand-in for a researcher's C simulation, the program the CRIU tests migrate.
 *
 * Its whole state is one private anonymous region of --mib MiB (MADV_NOHUGEPAGE: soft-dirty
 * tracks it in 4 KiB pages, so a pre-copy round sends what was dirtied, not 2 MiB per write)
 * plus a 64-bit accumulator. Step s rewrites words of one page chosen from s alone, each new
 * word mixed from the old one: the state after step s depends on every earlier step and on
 * every byte read back, so a page lost or corrupted by a migration changes all later output.
 * Every --every K steps it prints `step S crc X` (X: a hash of the whole region and the
 * accumulator), flushed. Nothing depends on time, pid or addresses: a run that was never
 * migrated prints the same lines for the same steps, which is what the tests compare.
 * --rate R paces it at R steps (pages dirtied) per second of wall time, rebased when the clock
 * jumps (a restore on another machine brings another CLOCK_MONOTONIC): no catch-up burst, no
 * long sleep. --steps N exits 0 after step N (1e9 style accepted). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define TOUCH 8u /* words rewritten per step */

static uint64_t mix(uint64_t x) { /* splitmix64's finaliser */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t number(const char *opt, const char *s) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || v < 0 || v > 1.8e19) {
        fprintf(stderr, "sim: bad %s %s\n", opt, s);
        exit(2);
    }
    return (uint64_t)v;
}

static uint64_t state_crc(const uint64_t *mem, uint64_t nwords, uint64_t acc) {
    uint64_t h = acc ^ 0x6a09e667f3bcc908ull;
    for (uint64_t i = 0; i < nwords; i++)
        h = (h ^ mem[i]) * 0x100000001b3ull + (h >> 29);
    return mix(h);
}

int main(int argc, char **argv) {
    uint64_t mib = 16, steps = 0, every = 1000, seed = 1;
    double rate = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "usage: sim [--mib N] [--rate PAGES/S] [--every K] [--steps N] "
                            "[--seed S]\n");
            return 2;
        }
        if (!strcmp(a, "--mib")) mib = number(a, v);
        else if (!strcmp(a, "--rate")) rate = (double)number(a, v);
        else if (!strcmp(a, "--every")) every = number(a, v);
        else if (!strcmp(a, "--steps")) steps = number(a, v);
        else if (!strcmp(a, "--seed")) seed = number(a, v);
        else {
            fprintf(stderr, "sim: unknown option %s\n", a);
            return 2;
        }
        i++;
    }
    if (!mib || !every) {
        fprintf(stderr, "sim: --mib and --every must be > 0\n");
        return 2;
    }
    uint64_t size = mib << 20, npages = size / PAGE, nwords = size / 8;
    uint64_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("sim: mmap");
        return 1;
    }
    madvise(mem, size, MADV_NOHUGEPAGE);
    for (uint64_t i = 0; i < nwords; i++)
        mem[i] = mix(seed ^ (i * 0x2545f4914f6cdd1dull));
    uint64_t acc = mix(seed);
    printf("step 0 crc %016llx\n", (unsigned long long)state_crc(mem, nwords, acc));
    fflush(stdout);

    double interval = rate > 0 ? 1.0 / rate : 0, next = now();
    for (uint64_t s = 1; !steps || s <= steps; s++) {
        uint64_t r = mix(seed * 0x9e3779b97f4a7c15ull + s);
        uint64_t *page = mem + (r % npages) * WORDS;
        for (unsigned k = 0; k < TOUCH; k++) {
            uint64_t *w = page + (mix(r + k) % WORDS);
            acc = mix(acc ^ *w);
            *w = acc ^ s;
        }
        if (s % every == 0) {
            printf("step %llu crc %016llx\n", (unsigned long long)s,
                   (unsigned long long)state_crc(mem, nwords, acc));
            fflush(stdout);
        }
        if (interval > 0) {
            next += interval;
            double t = now();
            if (t - next > 1.0 || next - t > 1.0) /* starved, frozen or another clock */
                next = t;
            else if (next > t) {
                double d = next - t;
                struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
                while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
                }
            }
        }
    }
    return 0;
}
