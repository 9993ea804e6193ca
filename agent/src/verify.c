#define _GNU_SOURCE
#include "verify.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "manifest.h"
#include "report.h"
#include "sha256.h"
#include "util.h"

#define HASH_CHUNK 65536
#define LINK_MAX_LEN 4096 /* the kernel's PATH_MAX bounds a symlink target */

struct verifier {
	const struct manifest *m;
	unsigned char *seen; /* per manifest entry: met on disk (or hidden by a mount) */
	dev_t root_dev;
	int see_mounts; /* no clean view of the root: skip other devices */
	int deep;
	long problems;
	char *rel; /* manifest-style path of the entry at hand; grows as needed */
	size_t rel_len, rel_cap;
};

/* One directory on the walk's stack: the subdirectories still to enter. Names
 * are kept, not descriptors, so depth costs heap and not open files. */
struct frame {
	char *names; /* NUL-separated */
	size_t next, end;
	size_t rel_len; /* length of the directory's own path in v->rel */
	dev_t dev;      /* identity, checked when the walk comes back up via ".." */
	ino_t ino;
};

static void problem(struct verifier *v, const char *path, const char *what, const char *want,
		    const char *have)
{
	if (v->problems++ < VERIFY_MAX_LISTED)
		marker("verify-problem", "path", path, "what", what, "want", want, "have", have,
		       (char *)NULL);
}

/* A check that failed with errno `err`; EIO also gets the integrity marker. */
static void problem_errno(struct verifier *v, const char *path, const char *what, int err)
{
	if (err == EIO && v->problems < VERIFY_MAX_LISTED) {
		char msg[64];
		snprintf(msg, sizeof msg, "checking %s: %s", what, strerror(err));
		report_integrity("verify", path, msg);
	}
	problem(v, path, what, "", strerror(err));
}

static void problem_num(struct verifier *v, const char *path, const char *what, const char *fmt,
			unsigned long long want, unsigned long long have)
{
	char w[32], h[32];
	snprintf(w, sizeof w, fmt, want);
	snprintf(h, sizeof h, fmt, have);
	problem(v, path, what, w, h);
}

static char type_of(mode_t m)
{
	switch (m & S_IFMT) {
	case S_IFREG: return MT_FILE;
	case S_IFDIR: return MT_DIR;
	case S_IFLNK: return MT_SYMLINK;
	case S_IFCHR: return MT_CHAR;
	case S_IFBLK: return MT_BLOCK;
	case S_IFIFO: return MT_FIFO;
	default: return MT_SOCKET;
	}
}

/* Set v->rel to the directory path of length dir_len plus "/name". */
static int rel_set(struct verifier *v, size_t dir_len, const char *name)
{
	size_t n = strlen(name);
	if (dir_len + n + 2 > v->rel_cap) {
		size_t cap = (dir_len + n + 2) * 2;
		char *bigger = realloc(v->rel, cap);
		if (!bigger)
			return -1;
		v->rel = bigger;
		v->rel_cap = cap;
	}
	v->rel[dir_len] = '/';
	memcpy(v->rel + dir_len + 1, name, n + 1);
	v->rel_len = dir_len + 1 + n;
	return 0;
}

/* sha256 of the file `name` in dirfd; -1 with errno on a failed open or read. */
static int hash_file(int dirfd, const char *name, char hex[65])
{
	int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return -1;
	static unsigned char buf[HASH_CHUNK];
	struct sha256 s;
	sha256_init(&s);
	ssize_t r;
	while ((r = read(fd, buf, sizeof buf)) > 0)
		sha256_update(&s, buf, (size_t)r);
	int err = errno;
	close(fd);
	if (r < 0) {
		errno = err;
		return -1;
	}
	unsigned char d[SHA256_DIGEST_LEN];
	sha256_final(&s, d);
	sha256_hex(d, hex);
	return 0;
}

/* Compare what is on disk (`name` in dirfd, already lstat'ed) with its entry. */
static void check_entry(struct verifier *v, const struct manifest_entry *e, int dirfd,
			const char *name, const struct stat *st)
{
	const char *path = e->path;
	char t[2] = {type_of(st->st_mode), 0}, want_t[2] = {e->type, 0};
	if (t[0] != e->type) {
		problem(v, path, "type", want_t, t);
		return;
	}
	if (e->type != MT_SYMLINK && (st->st_mode & 07777) != e->mode)
		problem_num(v, path, "mode", "%04llo", e->mode, st->st_mode & 07777);
	if (st->st_uid != e->uid || st->st_gid != e->gid) {
		char w[32], h[32];
		snprintf(w, sizeof w, "%u:%u", e->uid, e->gid);
		snprintf(h, sizeof h, "%u:%u", (unsigned)st->st_uid, (unsigned)st->st_gid);
		problem(v, path, "owner", w, h);
	}
	if ((e->type == MT_FILE || e->type == MT_SYMLINK) &&
	    (unsigned long long)st->st_size != e->size) {
		problem_num(v, path, "size", "%llu", e->size, (unsigned long long)st->st_size);
		return;
	}
	if (e->type == MT_SYMLINK) {
		char target[LINK_MAX_LEN];
		ssize_t n = readlinkat(dirfd, name, target, sizeof target - 1);
		if (n < 0) {
			problem_errno(v, path, "target", errno);
			return;
		}
		target[n] = '\0';
		if (strcmp(target, e->target))
			problem(v, path, "target", e->target, target);
	}
	if ((e->type == MT_CHAR || e->type == MT_BLOCK) &&
	    (major(st->st_rdev) != e->rmajor || minor(st->st_rdev) != e->rminor)) {
		char w[32], h[32];
		snprintf(w, sizeof w, "%u:%u", e->rmajor, e->rminor);
		snprintf(h, sizeof h, "%u:%u", major(st->st_rdev), minor(st->st_rdev));
		problem(v, path, "rdev", w, h);
	}
	if (v->deep && e->type == MT_FILE) {
		char hex[65];
		if (hash_file(dirfd, name, hex) < 0)
			problem_errno(v, path, "content", errno);
		else if (strcmp(hex, e->sha256))
			problem(v, path, "content", e->sha256, hex);
	}
}

static int dir_is_empty(int dirfd, const char *name)
{
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	DIR *d = fd < 0 ? NULL : fdopendir(fd);
	if (!d) {
		if (fd >= 0)
			close(fd);
		return 0;
	}
	int entries = 0;
	struct dirent *ent;
	while ((ent = readdir(d)))
		entries += strcmp(ent->d_name, ".") && strcmp(ent->d_name, "..");
	closedir(d);
	return entries == 0;
}

/* Paths the kernel or the agent makes at boot when the image lacks them: the
 * agent's mount points (empty directories) and the kernel's /dev/console of an
 * initramfs root. Not the image's, so never "unexpected". */
static int made_at_boot(const char *rel, int dirfd, const char *name, const struct stat *st)
{
	static const char *const mount_points[] = {"/proc", "/sys", "/dev", "/run", "/tmp", "/root"};
	if (!strcmp(rel, "/dev/console"))
		return S_ISCHR(st->st_mode);
	for (size_t i = 0; i < sizeof mount_points / sizeof mount_points[0]; i++)
		if (!strcmp(rel, mount_points[i]))
			return S_ISDIR(st->st_mode) &&
			       (!strcmp(rel, "/dev") || dir_is_empty(dirfd, name));
	return 0;
}

/* Mark every entry below v->rel as met: a mount hides them (sorted paths put
 * all those starting with "rel/" next to each other). */
static void mark_below(struct verifier *v)
{
	const struct manifest *m = v->m;
	size_t len = v->rel_len;
	size_t lo = 0, hi = m->n;
	while (lo < hi) { /* first entry >= rel + "/" */
		size_t mid = lo + (hi - lo) / 2;
		int c = strncmp(m->entries[mid].path, v->rel, len);
		if (c == 0)
			c = (unsigned char)m->entries[mid].path[len] < '/' ? -1 : 0;
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	for (size_t i = lo; i < m->n && !strncmp(m->entries[i].path, v->rel, len) &&
			    m->entries[i].path[len] == '/';
	     i++)
		v->seen[i] = 1;
}

/* Append name to the NUL-separated list of a frame. */
static int add_name(struct frame *f, size_t *cap, const char *name)
{
	size_t n = strlen(name) + 1;
	if (f->end + n > *cap) {
		size_t bigger_cap = (f->end + n) * 2;
		char *bigger = realloc(f->names, bigger_cap);
		if (!bigger)
			return -1;
		f->names = bigger;
		*cap = bigger_cap;
	}
	memcpy(f->names + f->end, name, n);
	f->end += n;
	return 0;
}

/* Check one directory entry found on disk; returns 1 when the walk should
 * enter it, 0 when not, -1 when out of memory. */
static int visit(struct verifier *v, int dirfd, const char *name)
{
	struct stat st;
	if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
		problem_errno(v, v->rel, "missing", errno);
		return 0;
	}
	const struct manifest_entry *e = manifest_find(v->m, v->rel);
	if (!e) {
		if (!made_at_boot(v->rel, dirfd, name, &st))
			problem(v, v->rel, "unexpected", "", "");
		return !strcmp(v->rel, "/dev") && S_ISDIR(st.st_mode);
	}
	v->seen[e - v->m->entries] = 1;
	if (v->see_mounts && st.st_dev != v->root_dev) {
		mark_below(v); /* something is mounted over it: its own attributes are hidden */
		return 0;
	}
	check_entry(v, e, dirfd, name, &st);
	return e->type == MT_DIR && S_ISDIR(st.st_mode);
}

/* Read the directory dirfd (path v->rel, length f->rel_len), check each entry
 * and fill f with the subdirectories to enter. -1 when out of memory. */
static int scan_dir(struct verifier *v, int dirfd, struct frame *f)
{
	size_t cap = 0;
	int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = fd < 0 ? NULL : fdopendir(fd);
	if (!d) {
		if (fd >= 0)
			close(fd);
		v->rel[f->rel_len] = '\0';
		problem_errno(v, f->rel_len ? v->rel : "/", "unreadable", errno);
		return 0;
	}
	struct dirent *ent;
	int rc = 0;
	for (errno = 0; rc == 0 && (ent = readdir(d)); errno = 0) {
		if (!strcmp(ent->d_name, ".") || !strcmp(ent->d_name, ".."))
			continue;
		if (rel_set(v, f->rel_len, ent->d_name) < 0) {
			rc = -1;
			break;
		}
		if (!strcmp(v->rel, AGENT_DIR))
			continue;
		int enter = visit(v, dirfd, ent->d_name);
		if (enter && add_name(f, &cap, ent->d_name) < 0)
			rc = -1;
	}
	int err = errno;
	closedir(d);
	if (rc == 0 && err) { /* readdir failed part way */
		v->rel[f->rel_len] = '\0';
		problem_errno(v, f->rel_len ? v->rel : "/", "unreadable", err);
	}
	return rc;
}

/* Push a frame for the directory dirfd (whose path is v->rel) and scan it. */
static int push(struct verifier *v, struct frame **stack, size_t *depth, size_t *cap, int dirfd)
{
	if (*depth == *cap) {
		size_t bigger_cap = *cap ? *cap * 2 : 64;
		struct frame *bigger = realloc(*stack, bigger_cap * sizeof *bigger);
		if (!bigger)
			return -1;
		*stack = bigger;
		*cap = bigger_cap;
	}
	struct stat st;
	if (fstat(dirfd, &st) < 0)
		return -1;
	struct frame *f = &(*stack)[(*depth)++];
	*f = (struct frame){.rel_len = v->rel_len, .dev = st.st_dev, .ino = st.st_ino};
	return scan_dir(v, dirfd, f);
}

/* Depth first over the tree below root_fd, with an explicit stack on the heap
 * (any depth: a directory chain deeper than PATH_MAX included), descending
 * with openat and coming back with "..", so one directory is open at a time.
 * Takes root_fd. Returns 0, or -1 with a reason in err. */
static int walk(struct verifier *v, int root_fd, char *err, size_t errlen)
{
	struct frame *stack = NULL;
	size_t depth = 0, cap = 0;
	int fd = root_fd, rc = push(v, &stack, &depth, &cap, fd);
	while (rc == 0 && depth) {
		struct frame *f = &stack[depth - 1];
		if (f->next < f->end) {
			const char *name = f->names + f->next;
			f->next += strlen(name) + 1;
			if (rel_set(v, f->rel_len, name) < 0) {
				rc = -1;
				break;
			}
			int child = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			if (child < 0) {
				problem_errno(v, v->rel, "unreadable", errno);
				continue;
			}
			close(fd);
			fd = child;
			rc = push(v, &stack, &depth, &cap, fd);
			continue;
		}
		free(f->names);
		if (--depth == 0)
			break;
		int up = openat(fd, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		struct stat st;
		const struct frame *parent = &stack[depth - 1];
		if (up < 0 || fstat(up, &st) < 0 || st.st_dev != parent->dev ||
		    st.st_ino != parent->ino) {
			if (up >= 0)
				close(up);
			snprintf(err, errlen, "the tree changed during the walk");
			rc = -2;
			break;
		}
		close(fd);
		fd = up;
	}
	if (rc == -1)
		snprintf(err, errlen, "out of memory walking the tree");
	while (depth)
		free(stack[--depth].names);
	free(stack);
	close(fd);
	errno = rc == -1 ? ENOMEM : rc == -2 ? ESTALE : 0;
	return rc < 0 ? -1 : 0;
}

long verify_walk(const char *root, const struct manifest *m, int deep, int see_mounts, char *err,
		 size_t errlen)
{
	struct verifier v = {.m = m, .deep = deep, .see_mounts = see_mounts};
	int fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		int e = errno;
		snprintf(err, errlen, "cannot open %s: %s", root, strerror(e));
		if (fd >= 0)
			close(fd);
		errno = e;
		return -1;
	}
	v.root_dev = st.st_dev;
	v.seen = calloc(m->n ? m->n : 1, 1);
	v.rel_cap = 256;
	v.rel = malloc(v.rel_cap);
	if (!v.seen || !v.rel) {
		snprintf(err, errlen, "out of memory walking the tree");
		close(fd);
		free(v.seen);
		free(v.rel);
		errno = ENOMEM;
		return -1;
	}
	v.rel[0] = '\0';
	const struct manifest_entry *top = manifest_find(m, "/");
	if (top) {
		v.seen[top - m->entries] = 1;
		check_entry(&v, top, fd, ".", &st);
	}
	long rc = walk(&v, fd, err, errlen);
	for (size_t i = 0; rc == 0 && i < m->n; i++) {
		const char *path = m->entries[i].path;
		if (!v.seen[i] && strcmp(path, AGENT_DIR) &&
		    strncmp(path, AGENT_DIR "/", strlen(AGENT_DIR) + 1))
			problem(&v, path, "missing", "", strerror(ENOENT));
	}
	int e = errno;
	free(v.seen);
	free(v.rel);
	errno = e;
	return rc < 0 ? -1 : v.problems;
}

long verify_tree(const char *manifest_path, int deep, char *err, size_t errlen)
{
	char *text = read_file(manifest_path, NULL);
	if (!text) {
		int e = errno;
		snprintf(err, errlen, "cannot read %s: %s", manifest_path, strerror(e));
		errno = e;
		return -1;
	}
	struct manifest m;
	if (manifest_parse(text, &m, err, errlen) < 0) {
		free(text);
		errno = EINVAL;
		return -1;
	}
	/* A non-recursive bind of / shows the root file system without the
	 * mounts on top (/dev, /proc...), hiding nothing the image holds. */
	const char *root = VERIFY_BIND_DIR;
	mkdir(VERIFY_BIND_DIR, 0700);
	if (mount("/", VERIFY_BIND_DIR, NULL, MS_BIND, NULL) < 0) {
		log_msg("no bind view of / (%s): mount points are skipped", strerror(errno));
		root = "/";
	}
	long problems = verify_walk(root, &m, deep, root[1] == '\0', err, errlen);
	int walk_errno = errno;
	if (root[1] != '\0') {
		umount2(VERIFY_BIND_DIR, MNT_DETACH);
		rmdir(VERIFY_BIND_DIR);
	}
	if (problems >= 0) {
		char entries[24], count[24];
		snprintf(entries, sizeof entries, "%zu", m.n);
		snprintf(count, sizeof count, "%ld", problems);
		marker("verify", "result", problems ? "fail" : "ok", "entries", entries, "problems",
		       count, "deep", deep ? "1" : "0", (char *)NULL);
	}
	manifest_free(&m);
	free(text);
	errno = walk_errno; /* a failed walk's cause, for the caller */
	return problems;
}
