#define _GNU_SOURCE
#include "runtime.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include "users.h"
#include "util.h"

#define SYS_BLOCK "/sys/block"
#define DISK_PREFIX "vd"
#define SECTOR 512
#define NINEP_OPTS "trans=virtio,version=9p2000.L,msize=262144"
#define SECRETS_OPTS "mode=0755,size=64m"
#define SECRET_MODE 0400
#define LOST_FOUND "lost+found"

static char g_home[HOME_MAX + 8]; /* "HOME=..." of a run-time user */
static const char *g_mounted[MAX_RUN_MOUNTS]; /* disk mount points, to unmount at the end */
static size_t g_nmounted;

int find_disk(const char *serial, char *path, size_t len)
{
	return find_device(SYS_BLOCK, DISK_PREFIX, "serial", serial, path, len);
}

int load_run_config(struct runcfg *rc, char *err, size_t errlen)
{
	char dev[64];
	if (find_disk(RUN_DISK_SERIAL, dev, sizeof dev) < 0)
		return 0;
	size_t len;
	char *text = read_file(dev, &len);
	if (!text) {
		snprintf(err, errlen, "cannot read the run disk %s: %s", dev, strerror(errno));
		return -1;
	}
	/* Nothing reads the disk again: its node goes, the text ends at the padding. */
	unlink(dev);
	if (len > MAX_RUN_DISK_BYTES || strlen(text) == len) {
		snprintf(err, errlen, "the run disk %s is not a padded run config", dev);
		return -1;
	}
	return runcfg_parse(text, rc, err, errlen) < 0 ? -1 : 1;
}

int apply_user(const char *spec, struct config *cfg, int keep_home, char *err, size_t errlen)
{
	char *passwd = read_file("/etc/passwd", NULL);
	char *group = read_file("/etc/group", NULL);
	struct user_ids u;
	int rc = resolve_user(spec, passwd, group, &u, err, errlen);
	free(passwd);
	free(group);
	if (rc < 0)
		return -1;
	unsigned *groups = NULL;
	if (u.ngroups && !(groups = malloc(u.ngroups * sizeof *groups)))
		return -1;
	if (u.ngroups)
		memcpy(groups, u.groups, u.ngroups * sizeof *groups);
	free(cfg->groups);
	cfg->groups = groups;
	cfg->ngroups = u.ngroups;
	cfg->uid = u.uid;
	cfg->gid = u.gid;
	snprintf(g_home, sizeof g_home, "HOME=%s", u.home);
	return keep_home ? 0 : env_set(&cfg->envp, &cfg->envc, g_home);
}

/* A fresh data disk (nothing but lost+found) goes to the workload's user. */
static void hand_over(const char *dir, const struct config *cfg)
{
	DIR *d = opendir(dir);
	if (!d)
		return;
	struct dirent *e;
	int empty = 1;
	while (empty && (e = readdir(d)))
		empty = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
			!strcmp(e->d_name, LOST_FOUND);
	closedir(d);
	struct stat st;
	if (empty && stat(dir, &st) == 0 && st.st_uid == 0 && cfg->uid != 0)
		chown(dir, cfg->uid, cfg->gid);
}

static int mount_one(const struct run_mount *m, const struct config *cfg, char *err,
		     size_t errlen)
{
	unsigned long flags = m->mode == RM_RO ? MS_RDONLY : 0;
	char dev[64];
	if (m->kind == RM_DISK && find_disk(m->source, dev, sizeof dev) < 0) {
		snprintf(err, errlen, "no disk with serial %s", m->source);
		errno = ENODEV;
		return -1;
	}
	if (!m->target[0])
		return 0; /* attached, left to the workload */
	make_dirs(m->target);
	int rc;
	if (m->kind == RM_VOLUME) {
		rc = mount(m->source, m->target, "9p", flags, NINEP_OPTS);
	} else {
		rc = mount(dev, m->target, "ext4", flags, NULL);
		/* A journal left to replay on a read-only disk: mount it as it is. */
		if (rc < 0 && errno == EROFS && m->mode == RM_RO)
			rc = mount(dev, m->target, "ext4", flags, "noload");
		if (rc < 0 && errno == EINVAL) /* not ext4: the kernel's other disk format */
			rc = mount(dev, m->target, "erofs", MS_RDONLY, NULL);
		if (rc == 0)
			g_mounted[g_nmounted++] = m->target;
	}
	if (rc < 0) {
		int e = errno;
		snprintf(err, errlen, "mount %s %s on %s: %s", m->kind == RM_VOLUME ? "volume" : "disk",
			 m->source, m->target, strerror(e));
		errno = e;
		return -1;
	}
	if (m->mode == RM_DATA)
		hand_over(m->target, cfg);
	return 0;
}

/* Each secret a file of SECRETS_DIR (a tmpfs, read-only once written), mode
 * 0400, owned by the workload's user. */
static int write_secrets(const struct runcfg *rc, const struct config *cfg, char *err,
			 size_t errlen)
{
	const char *step = "mount a tmpfs on " SECRETS_DIR;
	make_dirs(SECRETS_DIR);
	if (mount("tmpfs", SECRETS_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, SECRETS_OPTS) < 0)
		goto fail;
	for (size_t i = 0; i < rc->nsecrets; i++) {
		const struct secret *s = &rc->secrets[i];
		char path[sizeof SECRETS_DIR + MAX_SECRET_NAME + 1];
		snprintf(path, sizeof path, SECRETS_DIR "/%s", s->name);
		step = "write a secret";
		int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, SECRET_MODE);
		if (fd < 0)
			goto fail;
		int bad = write_all(fd, s->data, s->len) < 0 || fchown(fd, cfg->uid, cfg->gid) < 0;
		close(fd);
		if (bad)
			goto fail;
	}
	step = "make " SECRETS_DIR " read-only";
	if (mount(NULL, SECRETS_DIR, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
		  NULL) < 0)
		goto fail;
	return 0;
fail:;
	int e = errno;
	snprintf(err, errlen, "secrets: %s: %s", step, strerror(e));
	errno = e;
	return -1;
}

static int has_env(const struct runcfg *rc, const char *key)
{
	size_t n = strlen(key);
	for (size_t i = 0; i < rc->envc; i++)
		if (!strncmp(rc->env[i], key, n) && rc->env[i][n] == '=')
			return 1;
	return 0;
}

int apply_run_config(const struct runcfg *rc, struct config *cfg, char *err, size_t errlen)
{
	if (runcfg_apply(rc, cfg) < 0) {
		snprintf(err, errlen, "run config: out of memory");
		return -1;
	}
	if (rc->user && apply_user(rc->user, cfg, has_env(rc, "HOME"), err, errlen) < 0)
		return -1;
	cfg->null_stdin = rc->stdin_open == 0;
	for (size_t i = 0; i < rc->nmounts; i++)
		if (mount_one(&rc->mounts[i], cfg, err, errlen) < 0)
			return -1;
	return rc->nsecrets ? write_secrets(rc, cfg, err, errlen) : 0;
}

void console_mode(const struct runcfg *rc)
{
	struct termios t;
	if (rc->tty == 0 && tcgetattr(0, &t) == 0) {
		t.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL | ECHOCTL | ISIG | IEXTEN);
		t.c_oflag &= ~(tcflag_t)OPOST;
		t.c_iflag &= ~(tcflag_t)(ICRNL | IXON);
		tcsetattr(0, TCSANOW, &t);
	}
	if (rc->rows && rc->cols) {
		struct winsize ws = {.ws_row = (unsigned short)rc->rows,
				     .ws_col = (unsigned short)rc->cols};
		ioctl(0, TIOCSWINSZ, &ws);
	}
}

void unmount_run_disks(void)
{
	while (g_nmounted)
		umount2(g_mounted[--g_nmounted], 0);
}
