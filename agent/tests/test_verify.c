/* The verify walk on a real directory tree: problems found, and a directory
 * chain far deeper than any stack or PATH_MAX allows a recursive walk. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "manifest.h"
#include "report.h"
#include "sha256.h"
#include "util.h"
#include "verify.h"

#define DEPTH 5000 /* levels: /d/d/... is 10,000 bytes at the bottom */
#define HELLO "hello\n"

/* A growing text buffer for the manifest. */
struct text {
	char *buf;
	size_t len, cap;
};

static void put(struct text *t, const char *s)
{
	size_t n = strlen(s);
	if (t->len + n + 1 > t->cap) {
		t->cap = (t->len + n + 1) * 2;
		t->buf = realloc(t->buf, t->cap);
	}
	memcpy(t->buf + t->len, s, n + 1);
	t->len += n;
}

/* The manifest line for `path`, as vmimg/agent.py writes it (no escapes needed here). */
static void put_entry(struct text *t, const char *path, int dirfd, const char *name)
{
	struct stat st;
	char line[256], sha[65] = "-", target[64] = "-";
	CHECK(fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0);
	char type = S_ISDIR(st.st_mode) ? 'd' : S_ISLNK(st.st_mode) ? 'l' : 'f';
	if (type == 'f') {
		struct sha256 s;
		unsigned char d[SHA256_DIGEST_LEN];
		sha256_init(&s);
		sha256_update(&s, HELLO, strlen(HELLO));
		sha256_final(&s, d);
		sha256_hex(d, sha);
	}
	if (type == 'l') {
		ssize_t n = readlinkat(dirfd, name, target, sizeof target - 1);
		target[n < 0 ? 0 : n] = '\0';
	}
	snprintf(line, sizeof line, " %c %04o %u %u %llu 0:0 %s %s\n", type,
		 (unsigned)st.st_mode & 07777, (unsigned)st.st_uid, (unsigned)st.st_gid,
		 type == 'd' ? 0ULL : (unsigned long long)st.st_size, sha, target);
	put(t, path);
	put(t, line);
}

static FILE *console;

/* Run the walk with the console going to a fresh temp file. */
static long walk(const char *root, char *text, int deep)
{
	char err[256] = "";
	struct manifest m;
	if (console)
		fclose(console);
	console = tmpfile();
	g_console_fd = fileno(console);
	CHECK(manifest_parse(text, &m, err, sizeof err) == 0);
	long problems = verify_walk(root, &m, deep, 0, err, sizeof err);
	if (problems < 0)
		fprintf(stderr, "verify_walk: %s\n", err);
	manifest_free(&m);
	return problems;
}

/* Whether the console holds a verify-problem for what (and path, if given). */
static int reported(const char *what, const char *path)
{
	char line[2048], want[64];
	snprintf(want, sizeof want, " what=%s ", what);
	rewind(console);
	while (fgets(line, sizeof line, console))
		if (strstr(line, "@@vmimg@@ verify-problem ") && strstr(line, want) &&
		    (!path || strstr(line, path)))
			return 1;
	return 0;
}

static void write_at(int dirfd, const char *name, const char *data, unsigned mode)
{
	int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_TRUNC, mode);
	CHECK(fd >= 0 && write(fd, data, strlen(data)) == (ssize_t)strlen(data));
	close(fd);
}

/* A small tree: one of each problem the walk tells apart. */
static void small_tree(void)
{
	char root[] = "/tmp/vmimg-verify-XXXXXX";
	CHECK(mkdtemp(root) != NULL);
	int fd = open(root, O_RDONLY | O_DIRECTORY);
	mkdirat(fd, "etc", 0755);
	mkdirat(fd, "proc", 0755); /* an empty mount point: made at boot, not unexpected */
	mkdirat(fd, ".vmimg", 0755); /* the agent's: never looked at */
	int etc = openat(fd, "etc", O_RDONLY | O_DIRECTORY);
	write_at(etc, "motd", HELLO, 0644);
	write_at(etc, "group", HELLO, 0644);
	symlinkat("motd", etc, "link");

	struct text t = {0};
	put(&t, "vmimg-manifest 1\n");
	put_entry(&t, "/", fd, ".");
	put_entry(&t, "/etc", fd, "etc");
	put_entry(&t, "/etc/motd", etc, "motd");
	put_entry(&t, "/etc/group", etc, "group");
	put_entry(&t, "/etc/link", etc, "link");
	put(&t, "/etc/gone f 0644 0 0 0 0:0 " /* sha256 of nothing */
		"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 -\n");
	char *copy = strdup(t.buf);
	CHECK(walk(root, copy, 1) == 1 && reported("missing", "path=/etc/gone "));
	free(copy);

	write_at(etc, "motd", "HELLO\n", 0644); /* same size, other content */
	fchmodat(etc, "group", 0600, 0);
	unlinkat(etc, "link", 0);
	symlinkat("mot2", etc, "link");
	write_at(etc, "extra", "", 0644);
	copy = strdup(t.buf);
	CHECK(walk(root, copy, 1) == 5);
	CHECK(reported("content", "path=/etc/motd "));
	CHECK(reported("mode", "path=/etc/group "));
	CHECK(reported("target", "path=/etc/link "));
	CHECK(reported("unexpected", "path=/etc/extra "));
	CHECK(reported("missing", "path=/etc/gone "));
	free(copy);
	copy = strdup(t.buf); /* without deep, content is not read */
	CHECK(walk(root, copy, 0) == 4 && !reported("content", NULL));
	free(copy);

	for (const char *const *n = (const char *const[]){"motd", "group", "link", "extra", NULL};
	     *n; n++)
		unlinkat(etc, *n, 0);
	close(etc);
	for (const char *const *n = (const char *const[]){"etc", "proc", ".vmimg", NULL}; *n; n++)
		unlinkat(fd, *n, AT_REMOVEDIR);
	close(fd);
	CHECK(rmdir(root) == 0);
	free(t.buf);
}

/* DEPTH nested directories "d", with a file and a symlink at the bottom. */
static void deep_chain(void)
{
	char root[] = "/tmp/vmimg-verify-XXXXXX";
	CHECK(mkdtemp(root) != NULL);
	struct text t = {0}, path = {0};
	put(&t, "vmimg-manifest 1\n");
	int fd = open(root, O_RDONLY | O_DIRECTORY);
	put_entry(&t, "/", fd, ".");
	for (int i = 0; i < DEPTH; i++) {
		CHECK(mkdirat(fd, "d", 0755) == 0);
		put(&path, "/d");
		put_entry(&t, path.buf, fd, "d");
		int child = openat(fd, "d", O_RDONLY | O_DIRECTORY);
		CHECK(child >= 0);
		close(fd);
		fd = child;
	}
	write_at(fd, "f", HELLO, 0644);
	CHECK(symlinkat("f", fd, "l") == 0);
	size_t dir_len = path.len;
	put(&path, "/f");
	put_entry(&t, path.buf, fd, "f");
	path.buf[dir_len] = '\0';
	path.len = dir_len;
	put(&path, "/l");
	put_entry(&t, path.buf, fd, "l");

	char *copy = strdup(t.buf);
	CHECK(walk(root, copy, 1) == 0);
	free(copy);

	/* At the bottom: the link gone, a stray file; both found and named. */
	CHECK(unlinkat(fd, "l", 0) == 0);
	write_at(fd, "x", "", 0644);
	copy = strdup(t.buf);
	CHECK(walk(root, copy, 1) == 2);
	CHECK(reported("unexpected", "path=/d/d/d/d"));
	CHECK(reported("missing", "path=/d/d/d/d"));
	free(copy);

	unlinkat(fd, "f", 0);
	unlinkat(fd, "x", 0);
	for (int i = 0; i < DEPTH; i++) {
		int up = openat(fd, "..", O_RDONLY | O_DIRECTORY);
		close(fd);
		fd = up;
		CHECK(unlinkat(fd, "d", AT_REMOVEDIR) == 0);
	}
	close(fd);
	CHECK(rmdir(root) == 0);
	free(t.buf);
	free(path.buf);
}

int main(void)
{
	umask(022);
	small_tree();
	deep_chain();
	return check_done("verify");
}
