/* The reads of one jreshard restore, replayed with no Python: see replay.py, which records them and builds this.

   replay PLAN raw THREADS      every data file of PLAN read front to back into one fresh buffer per file,
                                16 MiB pieces taken in file order by THREADS threads (what _rawread.py does)
   replay PLAN replay THREADS   every recorded read (a file offset and its scatter rows) issued with preadv,
                                1,024 rows a call, into fresh blocks of the recorded sizes, THREADS threads
                                taking the reads in the order jreshard submitted them

   Buffers are fresh anonymous memory asked to be huge pages (as numpy's and jreshard's are); first touch happens
   inside the timing. Prints one line: mode, threads, wall, sys and user seconds, minor faults. Every count, size
   and row of the plan is checked against the blocks (and the junk buffer) before any buffer is mapped: a row
   outside its region stops the program (exit 2), as does a short read (exit 3). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define IOV_CALL 1024
#define RAW_PIECE (16LL << 20)

typedef struct { int64_t file, offset, n; int64_t *rows; } Read; /* rows: (block or -1 for junk, offset, length) */

static int64_t nfiles, nblocks, nreads, npieces, junk_size;
static int *fds;
static int64_t *file_size, *block_size;
static char **files_buf, **blocks;
static char *junk;
static Read *reads;
static int raw_mode;
static volatile int64_t next_item = 0;

static void die(const char *what) { perror(what); exit(2); }
static void bad(const char *what) { fprintf(stderr, "bad plan: %s\n", what); exit(2); }
static void *zalloc(int64_t count, int64_t size) {  /* zeroed, or exit 2: no allocation is left unchecked */
  void *p = calloc(count > 0 ? count : 1, size);
  if (!p) die("calloc");
  return p;
}

static char *fresh(int64_t n) {
  char *p = mmap(0, n > 0 ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) die("mmap");
  madvise(p, n > 0 ? n : 1, MADV_HUGEPAGE);
  return p;
}

static void full(int fd, struct iovec *iov, int n, int64_t offset, int64_t want) {
  int64_t got = preadv(fd, iov, n, offset);
  if (got != want) { fprintf(stderr, "short read: %lld of %lld at %lld\n", (long long)got, (long long)want, (long long)offset); exit(3); }
}

static void *work(void *arg) {
  (void)arg;
  struct iovec *iov = zalloc(IOV_CALL, sizeof(struct iovec));
  for (;;) {
    int64_t i = __sync_fetch_and_add(&next_item, 1);
    if (raw_mode) {
      if (i >= npieces) break;
      int64_t k = 0, j = i;
      while (j >= (file_size[k] + RAW_PIECE - 1) / RAW_PIECE) { j -= (file_size[k] + RAW_PIECE - 1) / RAW_PIECE; k++; }
      int64_t off = j * RAW_PIECE, len = file_size[k] - off < RAW_PIECE ? file_size[k] - off : RAW_PIECE;
      iov[0].iov_base = files_buf[k] + off;
      iov[0].iov_len = len;
      full(fds[k], iov, 1, off, len);
      continue;
    }
    if (i >= nreads) break;
    Read *r = &reads[i];
    int64_t off = r->offset;
    for (int64_t s = 0; s < r->n; s += IOV_CALL) {
      int64_t m = r->n - s < IOV_CALL ? r->n - s : IOV_CALL, want = 0;
      for (int64_t t = 0; t < m; t++) {
        int64_t *row = r->rows + 3 * (s + t);
        iov[t].iov_base = (row[0] < 0 ? junk : blocks[row[0]]) + row[1];  /* checked in main */
        iov[t].iov_len = row[2];
        want += row[2];
      }
      full(fds[r->file], iov, (int)m, off, want);
      off += want;
    }
  }
  free(iov);
  return 0;
}

static void get(void *p, size_t size, size_t n, FILE *f) { if (fread(p, size, n, f) != n) bad("truncated"); }

int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: %s PLAN raw|replay THREADS\n", argv[0]); return 2; }
  if (strcmp(argv[2], "raw") && strcmp(argv[2], "replay")) { fprintf(stderr, "mode: raw or replay\n"); return 2; }
  raw_mode = !strcmp(argv[2], "raw");
  int threads = atoi(argv[3]);
  if (threads < 1 || threads > 64) { fprintf(stderr, "threads: 1..64\n"); return 2; }
  FILE *f = fopen(argv[1], "rb");
  if (!f) die(argv[1]);
  fseek(f, 0, SEEK_END);
  int64_t plan_size = ftell(f);  /* no count may ask for more entries than the plan has bytes for */
  fseek(f, 0, SEEK_SET);
  int64_t h[4];
  get(h, 8, 4, f);
  nfiles = h[0]; nblocks = h[1]; nreads = h[2]; junk_size = h[3];
  if (nfiles < 0 || nfiles > 65536 || nfiles > plan_size / 8 || nblocks < 0 || nblocks > plan_size / 8 ||
      nreads < 0 || nreads > plan_size / 24 || junk_size < 0 || junk_size > (1LL << 30))
    bad("counts");
  fds = zalloc(nfiles, sizeof(int)); file_size = zalloc(nfiles, 8); files_buf = zalloc(nfiles, sizeof(char *));
  for (int64_t k = 0; k < nfiles; k++) {
    int64_t n;
    get(&n, 8, 1, f);
    if (n < 1 || n > 4096) bad("path length");
    char *path = zalloc(n + 1, 1);
    get(path, 1, n, f);
    if ((fds[k] = open(path, O_RDONLY)) < 0) die(path);
    file_size[k] = lseek(fds[k], 0, SEEK_END);
    if (file_size[k] < 0) die(path);
    npieces += (file_size[k] + RAW_PIECE - 1) / RAW_PIECE;
    free(path);
  }
  block_size = zalloc(nblocks, 8);
  get(block_size, 8, nblocks, f);
  for (int64_t k = 0; k < nblocks; k++) if (block_size[k] < 0 || block_size[k] > (1LL << 40)) bad("block size");
  reads = zalloc(nreads, sizeof(Read));
  for (int64_t i = 0; i < nreads; i++) {
    get(&reads[i], 8, 3, f);
    if (reads[i].file < 0 || reads[i].file >= nfiles || reads[i].offset < 0 || reads[i].n < 0 || reads[i].n > plan_size / 24)
      bad("read");
    reads[i].rows = zalloc(reads[i].n, 24);
    get(reads[i].rows, 24, reads[i].n, f);
    for (int64_t t = 0; t < reads[i].n; t++) {
      int64_t *row = reads[i].rows + 3 * t;
      if (row[0] < -1 || row[0] >= nblocks || row[1] < 0 || row[2] < 0) bad("row");
      int64_t size = row[0] < 0 ? junk_size : block_size[row[0]];
      if (row[1] > size || row[2] > size - row[1]) bad("row outside its region");
    }
  }
  fclose(f);
  /* Untimed: mapping the buffers (no page is touched until the reads). */
  if (raw_mode) for (int64_t k = 0; k < nfiles; k++) files_buf[k] = fresh(file_size[k]);
  else {
    blocks = zalloc(nblocks, sizeof(char *));
    for (int64_t k = 0; k < nblocks; k++) blocks[k] = fresh(block_size[k]);
    junk = zalloc(junk_size, 1);
  }
  struct rusage r0, r1;
  struct timespec t0, t1;
  getrusage(RUSAGE_SELF, &r0);
  clock_gettime(CLOCK_MONOTONIC, &t0);
  pthread_t th[64];
  for (int k = 0; k < threads; k++) pthread_create(&th[k], 0, work, 0);
  for (int k = 0; k < threads; k++) pthread_join(th[k], 0);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  getrusage(RUSAGE_SELF, &r1);
  printf("%s %d wall %.4f sys %.4f user %.4f minflt %ld\n", raw_mode ? "raw" : "replay", threads,
         (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9,
         (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) * 1e-6,
         (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) * 1e-6,
         r1.ru_minflt - r0.ru_minflt);
  return 0;
}
