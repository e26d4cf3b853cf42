/* Measured fp32 peak of this CPU: every physical core runs independent 256-bit FMA chains (12 accumulators,
   more than latency x pipes = 4 x 2 on Zen 3 / Skylake, so both FMA pipes stay busy) for a fixed count;
   peak FLOP/s = threads x iterations x 12 x 8 lanes x 2 / wall time. This catches turbo clocks that
   /proc/cpuinfo's nominal MHz hides (virtual machines often report the base clock only).
   Build: cc -O2 -mavx2 -mfma -pthread fma_peak.c -o fma_peak; run: fma_peak THREADS; prints GFLOP/s. */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ITERATIONS 1000000000L  /* ~2 s a thread at 3 GHz: long enough for the clock to settle */
#define CHAINS 12  /* acc0..acc11 below */

static float sink[64];

#define FMA12(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11)
#define DECLARE(i) __m256 acc##i = _mm256_set1_ps((float)i);
#define STEP(i) acc##i = _mm256_fmadd_ps(acc##i, a, b);
#define SUM(i) total = _mm256_add_ps(total, acc##i);

static void *chains(void *arg) {
    long id = (long)arg;
    __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f), total = _mm256_setzero_ps();
    FMA12(DECLARE)
    for (long n = 0; n < ITERATIONS; n++) {
        FMA12(STEP)
        /* an empty asm that "changes" the registers: the compiler cannot fold or shorten the chains */
        __asm__ volatile("" : "+x"(acc0), "+x"(acc1), "+x"(acc2), "+x"(acc3), "+x"(acc4), "+x"(acc5),
                         "+x"(acc6), "+x"(acc7), "+x"(acc8), "+x"(acc9), "+x"(acc10), "+x"(acc11));
    }
    FMA12(SUM)
    sink[id % 64] = _mm256_cvtss_f32(total);  /* keep the chains live */
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    pthread_t ids[256];
    struct timespec t0, t1;
    if (threads < 1 || threads > 256) return 2;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < threads; i++) pthread_create(&ids[i], NULL, chains, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("%.3f\n", threads * (double)ITERATIONS * CHAINS * 8 * 2 / seconds / 1e9);
    return 0;
}
