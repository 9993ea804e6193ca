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

struct verifier {
	const struct manifest *m;
	const char *root; /* prefix to put before manifest paths ("" for /) */
	dev_t root_dev;
	int see_mounts; /* no clean view of the root: skip other devices */
	long problems;
};

static void problem(struct verifier *v, const char *path, const char *what, const char *want,
		    const char *have)
{
	if (v->problems++ < VERIFY_MAX_LISTED)
		marker("verify-problem", "path", path, "what", what, "want", want, "have", have,
		       (char *)NULL);
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

static int hash_file(const char *path, char hex[65])
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return -1;
	static unsigned char buf[HASH_CHUNK];
	struct sha256 s;
	sha256_init(&s);
	ssize_t r;
	while ((r = read(fd, buf, sizeof buf)) > 0)
		sha256_update(&s, buf, (size_t)r);
	close(fd);
	if (r < 0)
		return -1;
	unsigned char d[SHA256_DIGEST_LEN];
	sha256_final(&s, d);
	sha256_hex(d, hex);
	return 0;
}

static void check_entry(struct verifier *v, const struct manifest_entry *e, int deep)
{
	char full[4096];
	struct stat st;
	snprintf(full, sizeof full, "%s%s", v->root, e->path);
	if (lstat(full[0] ? full : "/", &st) < 0) {
		problem(v, e->path, "missing", "", strerror(errno));
		return;
	}
	char t[2] = {type_of(st.st_mode), 0}, want_t[2] = {e->type, 0};
	if (t[0] != e->type) {
		problem(v, e->path, "type", want_t, t);
		return;
	}
	if (v->see_mounts && st.st_dev != v->root_dev)
		return; /* something is mounted over it: its own attributes are hidden */
	if (e->type != MT_SYMLINK && (st.st_mode & 07777) != e->mode)
		problem_num(v, e->path, "mode", "%04llo", e->mode, st.st_mode & 07777);
	if (st.st_uid != e->uid || st.st_gid != e->gid) {
		char w[32], h[32];
		snprintf(w, sizeof w, "%u:%u", e->uid, e->gid);
		snprintf(h, sizeof h, "%u:%u", (unsigned)st.st_uid, (unsigned)st.st_gid);
		problem(v, e->path, "owner", w, h);
	}
	if ((e->type == MT_FILE || e->type == MT_SYMLINK) &&
	    (unsigned long long)st.st_size != e->size) {
		problem_num(v, e->path, "size", "%llu", e->size, (unsigned long long)st.st_size);
		return;
	}
	if (e->type == MT_SYMLINK) {
		char target[4096];
		ssize_t n = readlink(full, target, sizeof target - 1);
		target[n < 0 ? 0 : n] = '\0';
		if (strcmp(target, e->target))
			problem(v, e->path, "target", e->target, target);
	}
	if ((e->type == MT_CHAR || e->type == MT_BLOCK) &&
	    (major(st.st_rdev) != e->rmajor || minor(st.st_rdev) != e->rminor)) {
		char w[32], h[32];
		snprintf(w, sizeof w, "%u:%u", e->rmajor, e->rminor);
		snprintf(h, sizeof h, "%u:%u", major(st.st_rdev), minor(st.st_rdev));
		problem(v, e->path, "rdev", w, h);
	}
	if (deep && e->type == MT_FILE) {
		char hex[65];
		if (hash_file(full, hex) < 0)
			problem(v, e->path, "content", e->sha256, strerror(errno));
		else if (strcmp(hex, e->sha256))
			problem(v, e->path, "content", e->sha256, hex);
	}
}

/* Paths the kernel or the agent makes at boot when the image lacks them: the
 * agent's mount points (empty directories) and the kernel's /dev/console of an
 * initramfs root. Not the image's, so never "unexpected". */
static int made_at_boot(const char *rel, const char *full)
{
	static const char *const mount_points[] = {"/proc", "/sys", "/dev", "/run", "/tmp", "/root"};
	struct stat st;
	if (lstat(full, &st) < 0)
		return 0;
	if (!strcmp(rel, "/dev/console"))
		return S_ISCHR(st.st_mode);
	for (size_t i = 0; i < sizeof mount_points / sizeof mount_points[0]; i++) {
		if (strcmp(rel, mount_points[i]))
			continue;
		DIR *d = S_ISDIR(st.st_mode) ? opendir(full) : NULL;
		if (!d)
			return 0;
		int entries = 0;
		struct dirent *ent;
		while ((ent = readdir(d)))
			entries += strcmp(ent->d_name, ".") && strcmp(ent->d_name, "..");
		closedir(d);
		return entries == 0 || (!strcmp(rel, "/dev"));
	}
	return 0;
}

/* Report entries on disk that the manifest does not list. `rel` is the
 * manifest-style path of the directory ("" for the root). */
static void find_unexpected(struct verifier *v, char *rel, size_t len)
{
	char full[4096];
	snprintf(full, sizeof full, "%s%s", v->root, len ? rel : "/");
	DIR *d = opendir(full);
	if (!d)
		return;
	struct dirent *ent;
	while ((ent = readdir(d))) {
		if (!strcmp(ent->d_name, ".") || !strcmp(ent->d_name, ".."))
			continue;
		size_t n = strlen(ent->d_name);
		if (len + 1 + n >= 4096)
			continue;
		rel[len] = '/';
		memcpy(rel + len + 1, ent->d_name, n + 1);
		if (!strcmp(rel, AGENT_DIR))
			continue;
		const struct manifest_entry *e = manifest_find(v->m, rel);
		if (!e) {
			char path[4096];
			snprintf(path, sizeof path, "%s%s", v->root, rel);
			if (!made_at_boot(rel, path))
				problem(v, rel, "unexpected", "", "");
			else if (!strcmp(rel, "/dev"))
				find_unexpected(v, rel, len + 1 + n);
			continue;
		}
		if (e->type != MT_DIR)
			continue;
		struct stat st;
		snprintf(full, sizeof full, "%s%s", v->root, rel);
		if (lstat(full, &st) == 0 && S_ISDIR(st.st_mode) &&
		    !(v->see_mounts && st.st_dev != v->root_dev))
			find_unexpected(v, rel, len + 1 + n);
	}
	rel[len] = '\0';
	closedir(d);
}

long verify_tree(const char *manifest_path, int deep, char *err, size_t errlen)
{
	char *text = read_file(manifest_path, NULL);
	if (!text) {
		snprintf(err, errlen, "cannot read %s: %s", manifest_path, strerror(errno));
		return -1;
	}
	struct manifest m;
	if (manifest_parse(text, &m, err, errlen) < 0) {
		free(text);
		return -1;
	}
	/* A non-recursive bind of / shows the root file system without the
	 * mounts on top (/dev, /proc...), hiding nothing the image holds. */
	struct verifier v = {.m = &m, .root = VERIFY_BIND_DIR};
	mkdir(VERIFY_BIND_DIR, 0700);
	if (mount("/", VERIFY_BIND_DIR, NULL, MS_BIND, NULL) < 0) {
		log_msg("no bind view of / (%s): mount points are skipped", strerror(errno));
		v.root = "";
		v.see_mounts = 1;
	}
	struct stat st;
	stat(v.root[0] ? v.root : "/", &st);
	v.root_dev = st.st_dev;
	for (size_t i = 0; i < m.n; i++)
		if (strcmp(m.entries[i].path, AGENT_DIR) && strncmp(m.entries[i].path, AGENT_DIR "/", 8))
			check_entry(&v, &m.entries[i], deep);
	char rel[4096] = "";
	find_unexpected(&v, rel, 0);
	if (!v.see_mounts) {
		umount2(VERIFY_BIND_DIR, MNT_DETACH);
		rmdir(VERIFY_BIND_DIR);
	}
	char entries[24], problems[24];
	snprintf(entries, sizeof entries, "%zu", m.n);
	snprintf(problems, sizeof problems, "%ld", v.problems);
	marker("verify", "result", v.problems ? "fail" : "ok", "entries", entries, "problems",
	       problems, "deep", deep ? "1" : "0", (char *)NULL);
	manifest_free(&m);
	free(text);
	return v.problems;
}
