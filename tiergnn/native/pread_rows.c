/* Batched row reads for tiergnn's storage tier: runs of consecutive row ids coalesced into one
 * pread each, issued from `threads` POSIX threads so the device sees a deep queue. Called through
 * ctypes (which releases the GIL); plain C, so it builds in well under a second with any cc. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct {
    int fd;
    const int64_t *ids;
    const int64_t *run_start;   /* index into ids where each run begins; n_runs + 1 entries */
    int64_t n_runs;
    unsigned char *out;
    int64_t row_bytes;
    int64_t next_run;           /* shared work counter */
    int64_t error;              /* 0, -errno, or 1 + the row where a read came up short */
} job_t;

static void *worker(void *arg) {
    job_t *job = (job_t *)arg;
    for (;;) {
        int64_t r = __atomic_fetch_add(&job->next_run, 1, __ATOMIC_RELAXED);
        if (r >= job->n_runs || __atomic_load_n(&job->error, __ATOMIC_RELAXED)) return NULL;
        int64_t a = job->run_start[r], b = job->run_start[r + 1];
        int64_t want = (b - a) * job->row_bytes, done = 0;
        off_t offset = (off_t)job->ids[a] * job->row_bytes;
        unsigned char *dst = job->out + a * job->row_bytes;
        while (done < want) {
            ssize_t got = pread(job->fd, dst + done, (size_t)(want - done), offset + done);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {          /* keep the first error any thread saw */
                int64_t code = got < 0 ? -(int64_t)errno : 1 + job->ids[a] + done / job->row_bytes;
                int64_t none = 0;
                __atomic_compare_exchange_n(&job->error, &none, code, 0, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED);
                return NULL;
            }
            done += got;
        }
    }
}

/* ids: sorted, unique. out: n * row_bytes bytes (aligned for O_DIRECT). Returns the number of
 * reads issued (>= 0) or a negative errno, or -(1 << 40) - row for a short read at `row`. */
int64_t tiergnn_read_rows(int fd, const int64_t *ids, int64_t n, unsigned char *out,
                          int64_t row_bytes, int threads) {
    if (n <= 0) return 0;
    int64_t *run_start = malloc(sizeof(int64_t) * (size_t)(n + 1));
    if (!run_start) return -ENOMEM;
    int64_t n_runs = 0;
    for (int64_t i = 0; i < n; i++)
        if (i == 0 || ids[i] != ids[i - 1] + 1) run_start[n_runs++] = i;
    run_start[n_runs] = n;
    job_t job = {fd, ids, run_start, n_runs, out, row_bytes, 0, 0};
    if (threads > n_runs) threads = (int)n_runs;
    if (threads < 1) threads = 1;
    pthread_t tids[256];
    if (threads > 256) threads = 256;
    int started = 0;
    for (int t = 1; t < threads; t++)
        if (pthread_create(&tids[started], NULL, worker, &job) == 0) started++;
    worker(&job);
    for (int t = 0; t < started; t++) pthread_join(tids[t], NULL);
    free(run_start);
    if (job.error < 0) return job.error;
    if (job.error > 0) return -((int64_t)1 << 40) - (job.error - 1);
    return n_runs;
}
