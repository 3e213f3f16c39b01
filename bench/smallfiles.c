/* The small-file cycle at C speed: create COUNT files in DIR with a 100-byte write each, stat every one,
 * unlink every one. Prints the seconds each phase took: "create stat unlink". Any failure exits 1 with the
 * file name and errno, so a broken file system cannot pass for a fast one. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int fail(const char *what, const char *name)
{
	fprintf(stderr, "smallfiles: %s %s: %s\n", what, name, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: smallfiles DIR COUNT\n");
		return 2;
	}
	int dir = open(argv[1], O_DIRECTORY | O_RDONLY | O_CLOEXEC);
	if (dir < 0)
		return fail("open", argv[1]);
	long count = strtol(argv[2], NULL, 10);
	char name[32], body[100];
	memset(body, 'x', sizeof body);

	double t0 = now();
	for (long i = 0; i < count; i++) {
		snprintf(name, sizeof name, "f%07ld", i);
		int fd = openat(dir, name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
		if (fd < 0)
			return fail("create", name);
		if (write(fd, body, sizeof body) != (ssize_t)sizeof body)
			return fail("write", name);
		if (close(fd) != 0)
			return fail("close", name);
	}
	double t1 = now();
	for (long i = 0; i < count; i++) {
		struct stat st;
		snprintf(name, sizeof name, "f%07ld", i);
		if (fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
			return fail("stat", name);
		if (st.st_size != (off_t)sizeof body) {
			errno = EIO;
			return fail("size of", name);
		}
	}
	double t2 = now();
	for (long i = 0; i < count; i++) {
		snprintf(name, sizeof name, "f%07ld", i);
		if (unlinkat(dir, name, 0) != 0)
			return fail("unlink", name);
	}
	double t3 = now();
	printf("%.6f %.6f %.6f\n", t1 - t0, t2 - t1, t3 - t2);
	return 0;
}
