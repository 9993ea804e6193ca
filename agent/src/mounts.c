#define _GNU_SOURCE
#include "mounts.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "util.h"

#define EROFS_MAGIC 0xe0f5e1e2UL
#define SQUASHFS_MAGIC 0x73717368UL
#define ISOFS_MAGIC 0x9660UL

enum { ESSENTIAL = 1, IF_EMPTY = 2 };

struct mount_spec {
	const char *source, *target, *type;
	unsigned long flags;
	const char *data;
	int how;
};

#define NOSUID_NODEV (MS_NOSUID | MS_NODEV)
static const struct mount_spec mounts[] = {
	{"proc", "/proc", "proc", NOSUID_NODEV | MS_NOEXEC, NULL, ESSENTIAL},
	{"sysfs", "/sys", "sysfs", NOSUID_NODEV | MS_NOEXEC, NULL, ESSENTIAL},
	{"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", ESSENTIAL},
	{"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666", 0},
	{"shm", "/dev/shm", "tmpfs", NOSUID_NODEV, "mode=1777", 0},
	{"tmpfs", "/run", "tmpfs", NOSUID_NODEV, "mode=0755", IF_EMPTY},
	{"tmpfs", "/tmp", "tmpfs", NOSUID_NODEV, "mode=1777", IF_EMPTY},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", NOSUID_NODEV | MS_NOEXEC, NULL, 0},
};

static const char *const dev_links[][2] = {
	{"/dev/fd", "/proc/self/fd"},
	{"/dev/stdin", "/proc/self/fd/0"},
	{"/dev/stdout", "/proc/self/fd/1"},
	{"/dev/stderr", "/proc/self/fd/2"},
	{"/dev/ptmx", "pts/ptmx"},
};

/* A mount point: on another device than its parent (or the root itself). */
static int is_mountpoint(const char *path)
{
	char parent[256];
	struct stat a, b;
	snprintf(parent, sizeof parent, "%s/..", path);
	if (stat(path, &a) < 0 || stat(parent, &b) < 0)
		return 0;
	return a.st_dev != b.st_dev || a.st_ino == b.st_ino;
}

/* A directory with nothing in it, or none at all (we create it). */
static int is_empty_dir(const char *path)
{
	DIR *d = opendir(path);
	if (!d)
		return errno == ENOENT;
	struct dirent *e;
	int empty = 1;
	while (empty && (e = readdir(d)))
		empty = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..");
	closedir(d);
	return empty;
}

/* Mount one spec; 0 when mounted or already there, else -1 with errno. */
static int mount_one(const struct mount_spec *m)
{
	if (is_mountpoint(m->target))
		return 0;
	if ((m->how & IF_EMPTY) && !is_empty_dir(m->target))
		return 0; /* keep what the image put there */
	if (mkdir(m->target, 0755) < 0 && errno != EEXIST && errno != EROFS)
		return -1;
	if (mount(m->source, m->target, m->type, m->flags, m->data) < 0 && errno != EBUSY)
		return -1;
	return 0;
}

int console_open(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0) {
		mkdir("/dev", 0755);
		if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") == 0)
			fd = open("/dev/console", O_RDWR | O_NOCTTY);
	}
	if (fd < 0 && mount("devtmpfs", SCRATCH_DIR, "devtmpfs", MS_NOSUID, NULL) == 0) {
		/* A read-only root without /dev: borrow the scratch dir. */
		fd = open(SCRATCH_DIR "/console", O_RDWR | O_NOCTTY);
		umount2(SCRATCH_DIR, MNT_DETACH);
	}
	if (fd < 0)
		return -1;
	for (int i = 0; i < 3; i++)
		if (fd != i)
			dup2(fd, i);
	if (fd > 2)
		close(fd);
	g_console_fd = 1;
	return 0;
}

int mount_proc(void)
{
	return mount_one(&mounts[0]);
}

int root_writable(void)
{
	struct statvfs sv;
	return statvfs("/", &sv) == 0 && !(sv.f_flag & ST_RDONLY);
}

static int root_is_readonly(void)
{
	struct statfs sf;
	if (statfs("/", &sf) < 0)
		return 0;
	unsigned long magic = (unsigned long)sf.f_type;
	return magic == EROFS_MAGIC || magic == SQUASHFS_MAGIC || magic == ISOFS_MAGIC ||
	       !root_writable();
}

#define OVL_UPPER SCRATCH_DIR "/upper"
#define OVL_WORK SCRATCH_DIR "/work"
#define OVL_ROOT SCRATCH_DIR "/root"

/* Move the mounts made so far (/dev, /proc, /sys) into the new root. */
static void move_submounts(void)
{
	static const char *const moved[] = {"/dev", "/proc", "/sys"};
	char target[64];
	for (size_t i = 0; i < sizeof moved / sizeof moved[0]; i++) {
		if (!is_mountpoint(moved[i]))
			continue;
		snprintf(target, sizeof target, "%s%s", OVL_ROOT, moved[i]);
		mkdir(target, 0755);
		if (mount(moved[i], target, NULL, MS_MOVE, NULL) < 0)
			log_msg("cannot move %s into the overlay: %s", moved[i], strerror(errno));
	}
}

int root_overlay(enum overlay_mode mode, char *err, size_t errlen)
{
	if (mode == OVERLAY_NEVER || (mode == OVERLAY_AUTO && !root_is_readonly()))
		return 0;
	struct stat root;
	const char *step = "stat /";
	if (stat("/", &root) < 0)
		goto fail;
	step = "mount tmpfs on " SCRATCH_DIR;
	mkdir(SCRATCH_DIR, 0755);
	if (mount("tmpfs", SCRATCH_DIR, "tmpfs", 0, "mode=0755") < 0)
		goto fail;
	step = "make the overlay dirs";
	if (mkdir(OVL_UPPER, root.st_mode & 07777) < 0 || mkdir(OVL_WORK, 0700) < 0 ||
	    mkdir(OVL_ROOT, 0755) < 0)
		goto fail;
	/* The merged root takes the upper dir's owner and mode: copy the image's. */
	if (chown(OVL_UPPER, root.st_uid, root.st_gid) < 0 ||
	    chmod(OVL_UPPER, root.st_mode & 07777) < 0)
		goto fail;
	step = "mount the overlay";
	if (mount("overlay", OVL_ROOT, "overlay", 0,
		  "lowerdir=/,upperdir=" OVL_UPPER ",workdir=" OVL_WORK) < 0)
		goto fail;
	move_submounts();
	step = "switch into the overlay";
	if (chdir(OVL_ROOT) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0)
		goto fail;
	return 0;
fail:;
	int e = errno;
	snprintf(err, errlen, "root overlay: %s: %s", step, strerror(e));
	errno = e; /* the caller tells an I/O error (integrity) from the rest */
	return -1;
}

int mount_all(char *err, size_t errlen)
{
	for (size_t i = 0; i < sizeof mounts / sizeof mounts[0]; i++) {
		if (mount_one(&mounts[i]) == 0)
			continue;
		if (mounts[i].how & ESSENTIAL) {
			int e = errno;
			snprintf(err, errlen, "mount %s on %s: %s", mounts[i].type, mounts[i].target,
				 strerror(e));
			errno = e;
			return -1;
		}
		log_msg("cannot mount %s on %s: %s", mounts[i].type, mounts[i].target,
			strerror(errno));
	}
	for (size_t i = 0; i < sizeof dev_links / sizeof dev_links[0]; i++)
		symlink(dev_links[i][1], dev_links[i][0]); /* EEXIST is fine */
	return 0;
}
