/*
 * /init of the test guest (examples/vm_live_update.py, tests/test_vm.py).
 *
 * Compiled with gcc -static and booted as the only program of an initramfs. It
 * takes MiB of guest RAM in one anonymous mapping, fills it with a pattern in
 * which every 8-byte word depends on its index and a generation number, and then
 * sweeps it forever: each word is checked against the current generation and
 * rewritten with the next one, so a restore that lost either the old contents or
 * the latest writes cannot pass. Every TICK_MS of guest time it prints one line:
 *
 *   vmcheck tick=N gen=G swept_mib=S mismatches=M stall_ms=X stall_max_ms=Y up_ms=T
 *
 * tick counts the lines (it lives in guest memory: after a restore it goes on from
 * where it was); stall_ms is the longest gap in this tick between two clock reads
 * that are normally a fraction of a millisecond apart (one 64 KiB step), stall_max_ms
 * the longest since the fill; both measured with the guest's own clock. C, not a
 * busybox shell loop: under TCG a shell would verify a few MiB a second.
 *
 * Kernel command line: ... -- MIB TICK_MS [GIVE_MIB AT_TICK]   (MIB 0: three quarters
 * of free RAM). With GIVE_MIB, the first sweep after tick AT_TICK ends by unmapping the
 * last GIVE_MIB of the memory: the guest kernel's free page reporting (virtio-balloon,
 * when the modules in /lib/modules load) tells QEMU, which punches that memory out of
 * the RAM file; the sweep goes on over the rest. The virtio modules, if the initramfs
 * has them, are loaded first (finit_module).
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/sysinfo.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define STEP_WORDS (64 * 1024 / 8)
#define K 0x9E3779B97F4A7C15ULL /* per-word increment */
#define G 0xD1B54A32D192ED03ULL /* per-generation mask */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 1)
        n = sizeof buf - 1;
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w <= 0)
            return;
        off += w;
    }
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void halt(void)
{
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}

/* The virtio-balloon driver and what it needs, in load order (absent ones are skipped). */
static const char *const modules[] = {
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_balloon",
};

static void load_modules(void)
{
    for (unsigned i = 0; i < sizeof modules / sizeof modules[0]; i++) {
        char path[128];
        snprintf(path, sizeof path, "/lib/modules/%s.ko", modules[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        if (syscall(SYS_finit_module, fd, "", 0) != 0)
            say("vmcheck: cannot load %s\n", modules[i]);
        close(fd);
    }
}

int main(int argc, char **argv)
{
    load_modules();
    uint64_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 0;
    uint64_t tick_ms = argc > 2 ? strtoull(argv[2], NULL, 10) : 500;
    uint64_t give_mib = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;
    uint64_t give_at = argc > 4 ? strtoull(argv[4], NULL, 10) : 0;
    if (mib == 0) {
        struct sysinfo si;
        sysinfo(&si);
        mib = (uint64_t)si.freeram * si.mem_unit / 4 * 3 >> 20;
    }
    uint64_t words = mib << 17;
    say("vmcheck: taking %llu MiB\n", (unsigned long long)mib);
    uint64_t *mem = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        say("vmcheck: FATAL cannot map %llu MiB\n", (unsigned long long)mib);
        halt();
    }
    uint64_t t0 = now_us();
    uint64_t v = 0;
    for (uint64_t i = 0; i < words; i++, v += K)
        mem[i] = v; /* generation 0: v ^ 0 */
    uint64_t t1 = now_us();
    say("vmcheck: ready mib=%llu fill_ms=%llu\n", (unsigned long long)mib,
        (unsigned long long)((t1 - t0) / 1000));

    uint64_t tick = 0, gen = 0, swept = 0, mismatches = 0;
    uint64_t stall = 0, stall_max = 0, last = now_us(), next_tick = last + tick_ms * 1000;
    for (;;) {
        uint64_t want = gen * G, next = (gen + 1) * G;
        v = 0;
        for (uint64_t i = 0; i < words; i += STEP_WORDS) {
            uint64_t end = i + STEP_WORDS < words ? i + STEP_WORDS : words;
            for (uint64_t j = i; j < end; j++, v += K) {
                uint64_t got = mem[j];
                if (got != (v ^ want)) {
                    if (mismatches < 10)
                        say("vmcheck: MISMATCH gen=%llu word=%llu got=%016llx want=%016llx\n",
                            (unsigned long long)gen, (unsigned long long)j,
                            (unsigned long long)got, (unsigned long long)(v ^ want));
                    mismatches++;
                }
                mem[j] = v ^ next;
            }
            swept += (end - i) * 8;
            uint64_t t = now_us();
            if (t - last > stall)
                stall = t - last;
            last = t;
            if (t >= next_tick) {
                if (stall > stall_max)
                    stall_max = stall;
                tick++;
                say("vmcheck tick=%llu gen=%llu swept_mib=%llu mismatches=%llu stall_ms=%llu.%03llu "
                    "stall_max_ms=%llu.%03llu up_ms=%llu\n",
                    (unsigned long long)tick, (unsigned long long)gen,
                    (unsigned long long)(swept >> 20), (unsigned long long)mismatches,
                    (unsigned long long)(stall / 1000), (unsigned long long)(stall % 1000),
                    (unsigned long long)(stall_max / 1000), (unsigned long long)(stall_max % 1000),
                    (unsigned long long)((t - t0) / 1000));
                stall = 0;
                last = now_us(); /* the console write is not a stall of memory */
                next_tick = last + tick_ms * 1000;
            }
        }
        gen++;
        if (give_mib && tick >= give_at && give_mib < mib) {
            munmap((char *)mem + ((mib - give_mib) << 20), give_mib << 20);
            mib -= give_mib;
            words = mib << 17;
            say("vmcheck: gave back %llu MiB, keeping %llu MiB\n", (unsigned long long)give_mib,
                (unsigned long long)mib);
            give_mib = 0;
        }
    }
}
