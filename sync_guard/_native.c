/* sync_guard's native half: a CUPTI callback and page-protected staging buffers.
 *
 * Built on first use by sync_guard/_native_build.py (cc -O2 -shared); needs no CUDA or Python
 * headers: CUPTI's callback data and the parameter structs it points to are read at fixed
 * offsets (64-bit layouts of the documented signatures), and the Python entry points it calls
 * come in as function pointers.
 *
 * The callback (sg_callback) sees, in the thread that made the call:
 *  - blocking calls (syncs): at entry, if the thread is armed, the Python judge is called;
 *  - a happens-before model of copies, events and host waits (vector clocks over streams):
 *    an async copy to or from a guarded range is pending until the host has waited on it
 *    (stream, event or device synchronization, or a query that returned success);
 *  - while a copy is pending, the pages it touches are protected: read-only for a copy that
 *    reads host memory (host to device), no access for one that writes it (device to host).
 * A host access to protected pages faults; sg_on_segv records the fault (address, thread, the
 * faulting thread's Python traceback written to a file by CPython's own async-signal-safe
 * dumper), opens the range again and returns, so the access completes and the process goes
 * on. Python drains the records (sg_take_faults) and reports them as BufferRace. A fault
 * outside every guarded range goes to the handler installed before ours.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_CBID 4096
#define MAX_RANGES 4096
#define MAX_PENDING 4096
/* torch hands out streams from pools of 32 per priority level (and a process making engine after
 * engine sees many of them), plus the default and per-thread streams */
#define MAX_STREAMS 160
#define FIRST_EVENTS 1024
#define MAX_EVENTS (1 << 22)
#define MAX_FAULTS 256
#define RW (PROT_READ | PROT_WRITE)

enum { DRIVER = 1, RUNTIME = 2 };
enum { API_ENTER = 0, API_EXIT = 1 };
enum { DEVICE_TO_DEVICE = 3 };

/* what a callback id means to the model (set by Python from the names CUPTI reports) */
enum {
  K_NONE, K_COPY_RT, K_COPY_DRV, K_EVENT_RECORD, K_STREAM_WAIT, K_EVENT_SYNC, K_EVENT_QUERY,
  K_STREAM_SYNC, K_STREAM_QUERY, K_DEVICE_SYNC, K_EVENT_DESTROY, K_OTHER_SYNC
};

typedef struct {
  int site;
  const char *function_name;
  const void *params;
  void *return_value;
  const char *symbol_name;
  void *context;
  uint32_t context_uid;
  uint64_t *correlation_data;
  uint32_t correlation_id;
} callback_data;

typedef struct {
  uint8_t kind;
  int16_t sync_name;   /* >= 0: a blocking call, judged; the index of its name in Python */
  int16_t kind_offset; /* >= 0: offset of a cudaMemcpyKind (device to device: not a sync) */
} callback_entry;

static callback_entry table[3][MAX_CBID];

typedef void (*judge_fn)(int name, int domain);
typedef void (*dump_fn)(int fd, void *tstate);
typedef void *(*tstate_fn)(void);
static judge_fn judge;
static dump_fn dump_traceback;
static tstate_fn this_thread_state;
static int dump_fd = -1;

/* Per thread: the scope state Python writes in place at each scope change (no call: it holds
 * the block's address, sg_thread_state), and the blocking calls recorded under a plain allow.
 * When the innermost scope is a plain allow, a blocking call is recorded here without a call
 * into Python (which must take the GIL torch released around the wait); Python reads the names
 * when that scope exits. Layout shared with pages.ThreadState. */
#define ALLOWED_RING 32
typedef struct {
  int32_t armed;       /* a sync here is judged */
  int32_t races_armed; /* copies from here protect their pages (a depth: nonzero is armed) */
  int32_t allow_fast;  /* the innermost scope is a plain allow */
  int32_t quiet;       /* a Python-level check judged this call already */
  uint64_t scope_serial;
  int32_t allowed_count;
  int32_t allowed_names[ALLOWED_RING];
} thread_state_t;
static __thread thread_state_t ts;
static __thread int runtime_depth;
/* Page protection is applied to one guarded copy in `protect_every` of each range (1: all;
 * 0: none); every copy is modelled either way. Counted per range: a thread's step that copies
 * from two buffers must not protect the same one every time. */
int protect_every = 1;

/* ---- guarded ranges, pending copies, the happens-before model (under `lock`) ---- */
typedef struct {
  _Atomic uintptr_t start; /* 0: a free slot */
  _Atomic uintptr_t end;
  _Atomic int protected_; /* some page is protected now */
  int pending;
  unsigned copies; /* guarded copies so far (the page-protection sample) */
} range_t;

typedef struct {
  int range;      /* -1: a free slot */
  int stream;     /* index into the clock tables */
  int to_host;    /* device to host: no host access while pending */
  int protect;    /* its pages are protected (sampled: SYNC_GUARD_PAGES) */
  uint64_t seq;   /* done once host_clock[stream] >= seq */
  uintptr_t lo, hi; /* the pages it touches */
  uint64_t serial, scope;
  pid_t tid;
} pending_t;

typedef struct {
  uintptr_t handle;
  int used;
  uint64_t clock[MAX_STREAMS];
} event_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static range_t ranges[MAX_RANGES];
static _Atomic int range_high; /* slots in use are below it */
static pending_t pending[MAX_PENDING];
static int pending_high;
static uintptr_t stream_handle[MAX_STREAMS];
static int stream_used[MAX_STREAMS];
static uint64_t stream_clock[MAX_STREAMS][MAX_STREAMS];
static uint64_t host_clock[MAX_STREAMS];
static event_t *events;       /* open addressing, grown at half load */
static size_t event_capacity, event_count;
static int events_overflowed; /* a record was lost: an unknown event's wait counts as the device's */
static uint64_t copy_serial;
static long page_size;
_Atomic uint64_t dropped; /* copies or events the tables had no room for (read by Python) */

/* ---- fault records (written by the signal handler, drained by Python) ---- */
typedef struct {
  _Atomic int ready;
  int range;
  int write;
  pid_t tid;
  uintptr_t addr;
  uint64_t serial, scope; /* the pending copy (0: none known) and its scope */
  pid_t copy_tid;
  int to_host;
  long dump_offset, dump_length;
} fault_t;

static fault_t faults[MAX_FAULTS];
_Atomic uint64_t fault_write; /* read by Python without a call (ctypes in_dll) */
static _Atomic uint64_t fault_read;
static atomic_flag dump_busy = ATOMIC_FLAG_INIT;
static struct sigaction previous;
static _Atomic int handler_installed;

static int stream_index(uintptr_t handle) {
  int free_slot = -1;
  for (int i = 0; i < MAX_STREAMS; i++) {
    if (stream_used[i] && stream_handle[i] == handle) return i;
    if (!stream_used[i] && free_slot < 0) free_slot = i;
  }
  if (free_slot < 0) { dropped++; return -1; }
  stream_used[free_slot] = 1;
  stream_handle[free_slot] = handle;
  memset(stream_clock[free_slot], 0, sizeof stream_clock[free_slot]);
  return free_slot;
}

static size_t event_hash(uintptr_t handle) { return (size_t)(handle >> 4) * 2654435761u; }

static event_t *probe(event_t *table, size_t capacity, uintptr_t handle, int *found) {
  size_t h = event_hash(handle);
  for (size_t i = 0; i < capacity; i++) {
    event_t *e = &table[(h + i) % capacity];
    if (!e->used || e->handle == handle) {
      *found = e->used;
      return e;
    }
  }
  *found = 0;
  return NULL;
}

static int grow_events(void) {
  size_t capacity = event_capacity ? 2 * event_capacity : FIRST_EVENTS;
  if (capacity > MAX_EVENTS) return -1;
  event_t *table = calloc(capacity, sizeof *table);
  if (!table) return -1;
  for (size_t i = 0; i < event_capacity; i++) {
    if (!events[i].used) continue;
    int found;
    *probe(table, capacity, events[i].handle, &found) = events[i];
  }
  free(events);
  events = table;
  event_capacity = capacity;
  return 0;
}

static event_t *find_event(uintptr_t handle, int create) {
  int found = 0;
  event_t *e = event_capacity ? probe(events, event_capacity, handle, &found) : NULL;
  if (found || !create) return found ? e : NULL;
  if (2 * (event_count + 1) > event_capacity) {
    if (grow_events() != 0) {
      events_overflowed = 1;
      dropped++;
      return NULL;
    }
    e = probe(events, event_capacity, handle, &found);
  }
  e->used = 1;
  e->handle = handle;
  event_count++;
  return e;
}

static void forget_event(uintptr_t handle) {
  int found;
  event_t *e = event_capacity ? probe(events, event_capacity, handle, &found) : NULL;
  if (!e || !found) return;
  e->used = 0;
  event_count--;
  /* open addressing: re-insert the run after the removed slot */
  size_t at = (size_t)(e - events);
  for (size_t next = (at + 1) % event_capacity; events[next].used;
       next = (next + 1) % event_capacity) {
    event_t moved = events[next];
    events[next].used = 0;
    *probe(events, event_capacity, moved.handle, &found) = moved;
  }
}

static int range_of(uintptr_t addr) {
  int high = atomic_load(&range_high);
  for (int i = 0; i < high; i++) {
    uintptr_t start = atomic_load(&ranges[i].start);
    if (start && addr >= start && addr < atomic_load(&ranges[i].end)) return i;
  }
  return -1;
}

/* Protect what the range's pending copies touch: read-only for host to device, nothing for
 * device to host (applied last, so it wins where both overlap). */
int sg_ensure_handler(void);

static void apply_protection(int r) {
  range_t *rg = &ranges[r];
  uintptr_t start = atomic_load(&rg->start), end = atomic_load(&rg->end);
  if (atomic_load(&rg->protected_)) {
    mprotect((void *)start, end - start, RW);
    atomic_store(&rg->protected_, 0);
  }
  if (!rg->pending) return;
  sg_ensure_handler();
  for (int pass = 0; pass < 2; pass++)
    for (int i = 0; i < pending_high; i++) {
      pending_t *p = &pending[i];
      if (p->range != r || p->to_host != pass || !p->protect) continue;
      mprotect((void *)p->lo, p->hi - p->lo, pass ? PROT_NONE : PROT_READ);
      atomic_store(&rg->protected_, 1);
    }
}

static void settle(void) {
  /* the host's clock moved: copies it now covers are done */
  static int touched[MAX_RANGES]; /* under the lock */
  int ntouched = 0;
  for (int i = 0; i < pending_high; i++) {
    pending_t *p = &pending[i];
    if (p->range < 0 || host_clock[p->stream] < p->seq) continue;
    int r = p->range;
    p->range = -1;
    ranges[r].pending--;
    if (!p->protect) continue;
    int seen = 0;
    for (int k = 0; k < ntouched; k++) seen |= touched[k] == r;
    if (!seen && ntouched < MAX_RANGES) touched[ntouched++] = r;
  }
  while (pending_high > 0 && pending[pending_high - 1].range < 0) pending_high--;
  for (int k = 0; k < ntouched; k++) apply_protection(touched[k]);
}

static void join(uint64_t *into, const uint64_t *from) {
  for (int i = 0; i < MAX_STREAMS; i++)
    if (into[i] < from[i]) into[i] = from[i];
}

static void host_waited_device(void) {
  for (int s = 0; s < MAX_STREAMS; s++)
    if (stream_used[s]) join(host_clock, stream_clock[s]);
  settle();
}

static void copy_enqueued(uintptr_t dst, uintptr_t src, size_t count, uintptr_t stream) {
  if (!count || !atomic_load(&range_high)) return;
  int r = range_of(src), to_host = 0;
  uintptr_t host = src;
  if (r < 0) {
    r = range_of(dst);
    to_host = 1;
    host = dst;
  }
  if (r < 0) return;
  int s = stream_index(stream);
  if (s < 0) return;
  int slot = -1;
  for (int i = 0; i < MAX_PENDING && slot < 0; i++)
    if (i >= pending_high || pending[i].range < 0) slot = i;
  if (slot < 0) { dropped++; return; }
  if (slot >= pending_high) pending_high = slot + 1;
  uintptr_t mask = ~((uintptr_t)page_size - 1);
  uintptr_t end = atomic_load(&ranges[r].end);
  uintptr_t hi = (host + count + page_size - 1) & mask;
  pending_t *p = &pending[slot];
  p->range = r;
  p->stream = s;
  p->to_host = to_host;
  p->seq = ++stream_clock[s][s];
  p->lo = host & mask;
  p->hi = hi < end ? hi : end;
  p->serial = ++copy_serial;
  p->scope = ts.scope_serial;
  p->tid = (pid_t)syscall(SYS_gettid);
  p->protect = protect_every > 0 && ranges[r].copies++ % (unsigned)protect_every == 0;
  ranges[r].pending++;
  if (p->protect) apply_protection(r);
}

static uintptr_t param(const callback_data *d, int offset) {
  return d->params ? *(const uintptr_t *)((const char *)d->params + offset) : 0;
}

static int succeeded(const callback_data *d) {
  return d->return_value && *(const int *)d->return_value == 0;
}

static void model(int kind, int domain, const callback_data *d) {
  event_t *e;
  int s;
  switch (kind) {
  case K_COPY_RT: /* cudaMemcpyAsync(dst, src, count, kind, stream) */
    if (succeeded(d) && ts.races_armed)
      copy_enqueued(param(d, 0), param(d, 8), param(d, 16), param(d, 32));
    break;
  case K_COPY_DRV: /* cuMemcpy{,HtoD,DtoH}Async(dst, src, count, stream) */
    if (succeeded(d) && ts.races_armed)
      copy_enqueued(param(d, 0), param(d, 8), param(d, 16), param(d, 24));
    break;
  case K_EVENT_RECORD: /* (event, stream) */
    if ((s = stream_index(param(d, 8))) >= 0 && (e = find_event(param(d, 0), 1)))
      memcpy(e->clock, stream_clock[s], sizeof e->clock);
    break;
  case K_STREAM_WAIT: /* (stream, event, flags) */
    if ((s = stream_index(param(d, 0))) >= 0 && (e = find_event(param(d, 8), 0)))
      join(stream_clock[s], e->clock);
    break;
  case K_EVENT_QUERY:
    if (!succeeded(d)) break;
    /* fall through */
  case K_EVENT_SYNC:
    if ((e = find_event(param(d, 0), 0))) {
      join(host_clock, e->clock);
      settle();
    } else if (events_overflowed) { /* its record may be the one lost: no false alarm */
      host_waited_device();
    }
    break;
  case K_STREAM_QUERY:
    if (!succeeded(d)) break;
    /* fall through */
  case K_STREAM_SYNC: {
    uintptr_t stream = param(d, 0);
    if (stream <= 2) { /* the legacy or per-thread default stream: taken as the device */
      host_waited_device();
    } else if ((s = stream_index(stream)) >= 0) {
      join(host_clock, stream_clock[s]);
      settle();
    }
    break;
  }
  case K_DEVICE_SYNC:
  case K_OTHER_SYNC:
    host_waited_device();
    break;
  case K_EVENT_DESTROY:
    forget_event(param(d, 0));
    break;
  }
  (void)domain;
}

uint64_t sg_calls[3][MAX_CBID]; /* entries seen per callback id (diagnostics; racy counts) */
uint64_t sg_judged;             /* calls into the Python judge */

void sg_callback(void *userdata, int domain, uint32_t cbid, const callback_data *d) {
  (void)userdata;
  if (domain != DRIVER && domain != RUNTIME) return;
  if (cbid >= MAX_CBID) return;
  if (d->site == API_ENTER) sg_calls[domain][cbid]++;
  callback_entry entry = table[domain][cbid];
  if (domain == RUNTIME) {
    if (d->site == API_ENTER) runtime_depth++;
    else if (runtime_depth > 0) runtime_depth--;
  } else if (runtime_depth > 0) {
    return; /* made by a runtime call we see: judged and modelled there */
  }
  if (d->site == API_ENTER) {
    if (entry.sync_name >= 0 && ts.armed && !ts.quiet) {
      if (entry.kind_offset >= 0 && d->params &&
          *(const int *)((const char *)d->params + entry.kind_offset) == DEVICE_TO_DEVICE)
        return;
      if (ts.allow_fast) {
        if (ts.allowed_count < ALLOWED_RING) ts.allowed_names[ts.allowed_count] = entry.sync_name;
        ts.allowed_count++;
      } else if (judge) {
        sg_judged++;
        judge(entry.sync_name, domain);
      }
    }
    return;
  }
  if (entry.kind == K_NONE) return;
  pthread_mutex_lock(&lock);
  model(entry.kind, domain, d);
  pthread_mutex_unlock(&lock);
}

/* ---- the fault handler ---- */
static void record_fault(int r, uintptr_t addr, int write) {
  uint64_t at = atomic_fetch_add(&fault_write, 1);
  if (at - atomic_load(&fault_read) >= MAX_FAULTS) return; /* full: Python counts the gap */
  fault_t *f = &faults[at % MAX_FAULTS];
  f->range = r;
  f->write = write;
  f->addr = addr;
  f->tid = (pid_t)syscall(SYS_gettid);
  f->serial = f->scope = 0;
  f->copy_tid = 0;
  f->to_host = 0;
  /* the pending copy that covers the address (read without the lock: best effort, and a
   * signal handler must not take it) */
  for (int i = 0; i < pending_high && i < MAX_PENDING; i++) {
    pending_t *p = &pending[i];
    if (p->range == r && addr >= p->lo && addr < p->hi) {
      f->serial = p->serial;
      f->scope = p->scope;
      f->copy_tid = p->tid;
      f->to_host = p->to_host;
      if (p->to_host) break;
    }
  }
  f->dump_offset = f->dump_length = -1;
  void *tstate = this_thread_state ? this_thread_state() : NULL;
  if (dump_fd >= 0 && dump_traceback && tstate) {
    while (atomic_flag_test_and_set(&dump_busy)) {}
    off_t start = lseek(dump_fd, 0, SEEK_END);
    dump_traceback(dump_fd, tstate);
    off_t end = lseek(dump_fd, 0, SEEK_CUR);
    atomic_flag_clear(&dump_busy);
    if (start >= 0 && end >= start) {
      f->dump_offset = start;
      f->dump_length = end - start;
    }
  }
  atomic_store(&f->ready, 1);
}

static void on_segv(int sig, siginfo_t *info, void *context) {
  uintptr_t addr = (uintptr_t)info->si_addr;
  int r = info->si_code == SEGV_ACCERR ? range_of(addr) : -1;
  if (r >= 0) {
    uintptr_t start = atomic_load(&ranges[r].start), end = atomic_load(&ranges[r].end);
    int write = 1;
#if defined(__x86_64__)
    write = (((ucontext_t *)context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#endif
    mprotect((void *)start, end - start, RW);
    atomic_store(&ranges[r].protected_, 0);
    record_fault(r, addr, write);
    return; /* the access runs again, now allowed */
  }
  if (previous.sa_flags & SA_SIGINFO) {
    if (previous.sa_sigaction) { previous.sa_sigaction(sig, info, context); return; }
  } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
    previous.sa_handler(sig);
    return;
  }
  /* no handler before ours: the default action, by faulting again without us */
  signal(sig, SIG_DFL);
}

/* ---- the Python-facing API ---- */
void sg_set_judge(void *judge_callback) { judge = (judge_fn)judge_callback; }

void sg_configure(void *dump, void *tstate, int fd) {
  dump_traceback = (dump_fn)dump;
  this_thread_state = (tstate_fn)tstate;
  dump_fd = fd;
  page_size = sysconf(_SC_PAGESIZE);
  for (int d = 0; d < 3; d++)
    for (int i = 0; i < MAX_CBID; i++) {
      table[d][i].kind = K_NONE;
      table[d][i].sync_name = -1;
      table[d][i].kind_offset = -1;
    }
}

int sg_set_callback(int domain, int cbid, int kind, int sync_name, int kind_offset) {
  if (domain < 0 || domain > 2 || cbid < 0 || cbid >= MAX_CBID) return -1;
  table[domain][cbid].kind = (uint8_t)kind;
  table[domain][cbid].sync_name = (int16_t)sync_name;
  table[domain][cbid].kind_offset = (int16_t)kind_offset;
  return 0;
}

/* This thread's state block (thread_state_t); valid for the thread's lifetime. */
void *sg_thread_state(void) { return &ts; }

size_t sg_thread_state_size(void) { return sizeof ts; }

/* Ours must be the first handler a fault reaches: installed again if someone replaced it
 * (faulthandler, for one), keeping theirs as the one faults outside our ranges go to. */
int sg_ensure_handler(void) {
  struct sigaction now;
  if (sigaction(SIGSEGV, NULL, &now) != 0) return -1;
  if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_segv) return 0;
  struct sigaction ours;
  memset(&ours, 0, sizeof ours);
  ours.sa_sigaction = on_segv;
  ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
  sigemptyset(&ours.sa_mask);
  previous = now;
  if (sigaction(SIGSEGV, &ours, NULL) != 0) return -1;
  atomic_store(&handler_installed, 1);
  return 1;
}

/* A guarded range: whole pages [start, end). Returns its slot, or -1. */
int sg_add_range(uintptr_t start, uintptr_t end) {
  if (!page_size) page_size = sysconf(_SC_PAGESIZE);
  if (start % page_size || end % page_size || end <= start) return -2;
  pthread_mutex_lock(&lock);
  int slot = -1;
  for (int i = 0; i < MAX_RANGES && slot < 0; i++)
    if (!atomic_load(&ranges[i].start)) slot = i;
  if (slot >= 0) {
    ranges[slot].pending = 0;
    ranges[slot].copies = 0;
    atomic_store(&ranges[slot].protected_, 0);
    atomic_store(&ranges[slot].end, end);
    atomic_store(&ranges[slot].start, start);
    if (slot >= atomic_load(&range_high)) atomic_store(&range_high, slot + 1);
  }
  pthread_mutex_unlock(&lock);
  return slot;
}

/* The range goes (its memory is freed, or the guard is uninstalled): pages open again. */
void sg_remove_range(int r) {
  if (r < 0 || r >= MAX_RANGES) return;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < pending_high; i++)
    if (pending[i].range == r) pending[i].range = -1;
  ranges[r].pending = 0;
  apply_protection(r);
  atomic_store(&ranges[r].start, 0);
  pthread_mutex_unlock(&lock);
}

/* Every page open again and every pending copy forgotten (scope exit with an exception,
 * uninstall, process exit). */
void sg_release_all(void) {
  pthread_mutex_lock(&lock);
  for (int i = 0; i < pending_high; i++) pending[i].range = -1;
  pending_high = 0;
  int high = atomic_load(&range_high);
  for (int r = 0; r < high; r++)
    if (atomic_load(&ranges[r].start)) {
      ranges[r].pending = 0;
      apply_protection(r);
    }
  pthread_mutex_unlock(&lock);
}

/* Fault records into `out` (as many as fit); returns how many, and the number lost to a
 * full buffer through `lost`. */
int sg_take_faults(fault_t *out, int capacity, uint64_t *lost) {
  int n = 0;
  uint64_t write_at = atomic_load(&fault_write);
  uint64_t read_at = atomic_load(&fault_read);
  if (write_at - read_at > MAX_FAULTS) {
    *lost += write_at - read_at - MAX_FAULTS;
    read_at = write_at - MAX_FAULTS;
  }
  while (read_at < write_at && n < capacity) {
    fault_t *f = &faults[read_at % MAX_FAULTS];
    if (!atomic_load(&f->ready)) break; /* still being written */
    out[n] = *f;
    out[n].ready = 1;
    atomic_store(&f->ready, 0);
    n++;
    read_at++;
  }
  atomic_store(&fault_read, read_at);
  return n;
}

/* How many pending copies and protected ranges there are (tests, reports). */
void sg_counts(int *pending_copies, int *protected_ranges, uint64_t *lost) {
  pthread_mutex_lock(&lock);
  int n = 0, p = 0;
  for (int i = 0; i < pending_high; i++) n += pending[i].range >= 0;
  int high = atomic_load(&range_high);
  for (int r = 0; r < high; r++) p += atomic_load(&ranges[r].start) && atomic_load(&ranges[r].protected_);
  *pending_copies = n;
  *protected_ranges = p;
  *lost = dropped;
  pthread_mutex_unlock(&lock);
}

size_t sg_fault_record_size(void) { return sizeof(fault_t); }
