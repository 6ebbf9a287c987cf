// Microbenchmark of patch 0009's multi-row Q4_K MoE kernels (issue 28): thread CPU time per expert pass.
//
//   g++ -O2 -o /tmp/moe_rows_harness benchmarks/moe_rows_harness.cpp -ldl
//   /tmp/moe_rows_harness RUNTIME/lib/libggml-cpu.so E R MODE [REPS] [TOUCHED] [PF_NEXT_BYTES] [THREADS]
//
// E experts of the mini shape's ffn_gate/up (2048 in, 512 out, repacked Q4_K 8x8: 590 KB each; random quants, unit
// scales), R activation rows per expert, MODE vnni (ggml_gemv_q4_K_8x8_q8_K_rows: the build's best kernel), avx2
// (the AVX2 multi-row kernel) or gemv (one upstream GEMV per row). TOUCHED of the E experts (a random ascending
// subset, as MUL_MAT_ID walks them) are run per pass; the best of REPS passes is printed as us per expert, GB/s of
// expert weights and GMAC/s, single thread. E=1 keeps the expert in L2 (the kernel's compute rate); E=256 TOUCHED=93
// streams from DRAM like a 32-distinct-token step. PF_NEXT_BYTES > 0 prefetches that much of the next expert first.
// THREADS > 1 splits each expert's output columns between threads as ggml's MUL_MAT_ID does (each thread its own
// contiguous slice of every expert); then the figures are wall time (per pass, best of REPS) for all threads.
#include <dlfcn.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <ctime>
#include <vector>
#include <thread>
#include <chrono>
typedef void (*rows_fn)(int, float * const *, const void *, const void * const *, int, int);
typedef void (*gemv_fn)(int, float *, size_t, const void *, const void *, int, int);
static double tcpu() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(int argc, char ** argv) {
    const char * lib = argv[1];
    int E = atoi(argv[2]);        // experts (distinct matrices)
    int R = atoi(argv[3]);        // rows per expert
    const char * mode = argv[4];  // vnni | avx2 | gemv
    int reps = argc > 5 ? atoi(argv[5]) : 3;
    int touched = argc > 6 ? atoi(argv[6]) : E;   // experts used, ascending random subset of E
    int pfnext = argc > 7 ? atoi(argv[7]) : 0;    // prefetch this many bytes of the next expert first
    int nth = argc > 8 ? atoi(argv[8]) : 1;
    void * h = dlopen(lib, RTLD_NOW);
    if (!h) { printf("%s\n", dlerror()); return 1; }
    rows_fn best = (rows_fn) dlsym(h, "ggml_gemv_q4_K_8x8_q8_K_rows");
    rows_fn avx2 = (rows_fn) dlsym(h, "ggml_gemv_q4_K_8x8_q8_K_rows_avx2");
    gemv_fn gemv = (gemv_fn) dlsym(h, "ggml_gemv_q4_K_8x8_q8_K");
    if (!best || !avx2 || !gemv) { printf("missing symbols\n"); return 1; }
    const int n = 2048, nc = 512, nb = n / 256;
    const size_t blk = 1152, mat = (size_t) (nc / 8) * nb * blk;
    std::vector<uint8_t> W((size_t) E * mat);
    srand(1);
    for (auto & b : W) b = rand();
    for (int e = 0; e < E; e++) for (int x = 0; x < (nc / 8) * nb; x++) {
        uint16_t * d = (uint16_t *) (W.data() + e * mat + x * blk);
        for (int i = 0; i < 16; i++) d[i] = 0x3C00;
    }
    const size_t qsz = 4 + 256 + 32;
    std::vector<uint8_t> A((size_t) R * nb * qsz);
    for (auto & b : A) b = rand() % 200;
    for (int r = 0; r < R * nb; r++) { float one = 0.01f; memcpy(A.data() + r * qsz, &one, 4); }
    std::vector<float> out((size_t) R * nc);
    float * s[16]; const void * a[16];
    for (int r = 0; r < R; r++) { s[r] = out.data() + r * nc; a[r] = A.data() + (size_t) r * nb * qsz; }
    std::vector<int> ids;
    for (int e = 0; e < E; e++) if (rand() % E < touched) ids.push_back(e);
    double best_t = 1e9;
    auto pass = [&](int ith) {
        const int c0 = (nc / 8 * ith / nth) * 8, c1 = (nc / 8 * (ith + 1) / nth) * 8;  // this thread's columns
        float * so[16];
        for (int r = 0; r < R; r++) so[r] = s[r] + c0;
        for (size_t i = 0; i < ids.size(); i++) {
            const char * w = (const char *) W.data() + ids[i] * mat + (size_t) (c0 / 8) * nb * blk;
            if (pfnext && i + 1 < ids.size()) {
                const char * nx = (const char *) W.data() + ids[i + 1] * mat + (size_t) (c0 / 8) * nb * blk;
                for (int o = 0; o < pfnext; o += 64) __builtin_prefetch(nx + o, 0, 2);
            }
            if (!strcmp(mode, "vnni")) best(n, so, w, a, R, c1 - c0);
            else if (!strcmp(mode, "avx2")) avx2(n, so, w, a, R, c1 - c0);
            else for (int r = 0; r < R; r++) gemv(n, so[r], 0, w, a[r], 1, c1 - c0);
        }
    };
    for (int rep = 0; rep < reps; rep++) {
        double t;
        if (nth == 1) {
            double t0 = tcpu();
            pass(0);
            t = tcpu() - t0;
        } else {
            auto t0 = std::chrono::steady_clock::now();
            std::vector<std::thread> th;
            for (int i = 0; i < nth; i++) th.emplace_back(pass, i);
            for (auto & x : th) x.join();
            t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
        if (t < best_t) best_t = t;
    }
    double per = best_t / ids.size();
    printf("%s E=%d touched=%zu R=%d threads=%d: %.1f us/expert, %.1f GB/s, %.1f GMAC/s\n", mode, E, ids.size(), R, nth, per * 1e6, mat / per / 1e9,
           (double) R * n * nc / per / 1e9);
    return 0;
}
