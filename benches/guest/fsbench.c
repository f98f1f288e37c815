/* Guest side of vmbuild's file-sharing benchmark: runs inside the guest kit, times each
 * workload with CLOCK_MONOTONIC, prints one "name seconds detail" line per workload.
 * Built static by the benchmark (busybox's shell would time its own forks, not the
 * file system). */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long files, bytes;
static char buf[1 << 20];

/* find + stat: readdir every directory, lstat every entry. */
static void walk(const char *path, int read_files) {
    DIR *d = opendir(path);
    if (!d) { perror(path); exit(2); }
    struct dirent *e;
    char sub[4096];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
        struct stat st;
        if (lstat(sub, &st)) { perror(sub); exit(2); }
        if (S_ISDIR(st.st_mode)) {
            walk(sub, read_files);
        } else if (S_ISREG(st.st_mode)) {
            files++;
            if (read_files) {
                int fd = open(sub, O_RDONLY);
                if (fd < 0) { perror(sub); exit(2); }
                ssize_t n;
                while ((n = read(fd, buf, sizeof buf)) > 0) bytes += n;
                close(fd);
            }
        }
    }
    closedir(d);
}

static void seq_read(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) { perror(path); exit(2); }
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) bytes += n;
    close(fd);
}

static void write_files(const char *dir, int count, int size) {
    char path[4096];
    memset(buf, 'x', sizeof buf);
    for (int i = 0; i < count; i++) {
        snprintf(path, sizeof path, "%s/small-%04d", dir, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, buf, size) != size) { perror(path); exit(2); }
        close(fd);
        files++;
        bytes += size;
    }
}

static void write_big(const char *path, long size) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(path); exit(2); }
    for (long done = 0; done < size; done += sizeof buf) {
        if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) { perror(path); exit(2); }
        bytes += sizeof buf;
    }
    if (fsync(fd)) { perror("fsync"); exit(2); }
    close(fd);
}

/* A build log: many small appends to one file, as make and compilers write their output. */
static void append_lines(const char *path, int count, int size) {
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_TRUNC, 0644);
    if (fd < 0) { perror(path); exit(1); }
    memset(buf, 'l', size - 1);
    buf[size - 1] = '\n';
    for (int i = 0; i < count; i++) {
        if (write(fd, buf, size) != size) { perror("append"); exit(1); }
        bytes += size;
    }
    close(fd);
}

/* fsbench STORE_TREE STORE_BIG XCHG_DIR */
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: fsbench TREE BIGFILE XCHGDIR\n"); return 2; }
    double t;

    files = bytes = 0; t = now(); walk(argv[1], 0);
    printf("metadata %.6f files=%ld\n", now() - t, files);

    files = bytes = 0; t = now(); walk(argv[1], 1);
    printf("small_read %.6f files=%ld bytes=%ld\n", now() - t, files, bytes);

    files = bytes = 0; t = now(); seq_read(argv[2]);
    printf("seq_read %.6f bytes=%ld\n", now() - t, bytes);

    char dir[4096];
    snprintf(dir, sizeof dir, "%s/bench-out", argv[3]);
    mkdir(dir, 0755);
    files = bytes = 0; t = now(); write_files(dir, 500, 4096); sync();
    printf("small_write %.6f files=%ld bytes=%ld\n", now() - t, files, bytes);

    snprintf(dir, sizeof dir, "%s/bench-out/build.log", argv[3]);
    files = bytes = 0; t = now(); append_lines(dir, 20000, 64); sync();
    printf("append %.6f bytes=%ld\n", now() - t, bytes);

    snprintf(dir, sizeof dir, "%s/bench-out/big", argv[3]);
    files = bytes = 0; t = now(); write_big(dir, 64L << 20);
    printf("seq_write %.6f bytes=%ld\n", now() - t, bytes);
    return 0;
}
