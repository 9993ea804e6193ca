/* The run config: what one boot changes from the image's config (docs/agent.md,
 * "Run config"). `vmimg run` writes it onto a small read-only disk whose
 * virtio serial is "vmimg-run", so that environment values and secrets stay
 * off the kernel command line; `vmimg exec` sends the same format as its
 * request. Format: a first line "vmimg-run-config 1", then lines of
 * space-separated fields, each percent-escaped, the first field the key. */
#ifndef VMIMG_RUNCFG_H
#define VMIMG_RUNCFG_H

#include <stddef.h>

#include "config.h"

#define RUNCFG_MAGIC "vmimg-run-config"
#define RUNCFG_VERSION 1
#define RUN_DISK_SERIAL "vmimg-run"
#define MAX_RUN_MOUNTS 32
#define MAX_SECRETS 64
#define MAX_SECRET_BYTES (500 * 1024) /* as Docker's secrets */
#define MAX_SECRET_NAME 255
#define MAX_WINSIZE 65535

enum run_mount_kind { RM_VOLUME, RM_DISK };
/* ro, rw, or data: rw, and an empty root is handed to the workload's user. */
enum run_mount_mode { RM_RO, RM_RW, RM_DATA };

struct run_mount {
	enum run_mount_kind kind;
	char *source; /* 9p mount tag, or the disk's virtio serial */
	char *target; /* absolute guest path, "" for a disk left unmounted */
	enum run_mount_mode mode;
};

struct secret {
	char *name;
	char *data; /* decoded bytes, not NUL terminated */
	size_t len;
};

struct runcfg {
	char **argv; /* NULL terminated, or NULL: keep the config's */
	size_t argc;
	char **env; /* "K=V" entries merged over the config's */
	size_t envc;
	char *cwd;      /* NULL: keep */
	char *user;     /* NULL: keep; else name|uid[:group|gid] */
	char *hostname; /* NULL: keep */
	int tty;        /* -1 unset, 0 the console without echo or output processing, 1 a tty */
	int stdin_open; /* -1 unset, 0 stdin is /dev/null, 1 the console (or the exec stream) */
	unsigned rows, cols; /* terminal size, 0 unset */
	long stop_timeout;   /* seconds, -1 unset */
	unsigned stop_signal; /* 0 unset */
	struct run_mount mounts[MAX_RUN_MOUNTS];
	size_t nmounts;
	struct secret secrets[MAX_SECRETS];
	size_t nsecrets;
};

/* Parse `text` (modified in place; the results point into it). Returns 0, or
 * -1 with a one-line reason in err (never a secret's bytes). */
int runcfg_parse(char *text, struct runcfg *rc, char *err, size_t errlen);

/* Apply argv, env, cwd and hostname to the config (its arrays grow; the
 * strings stay rc's). Returns 0 or -1 (out of memory). */
int runcfg_apply(const struct runcfg *rc, struct config *cfg);

/* Set (replace or add) one "K=V" entry of a NULL-terminated environment. */
int env_set(char ***envp, size_t *envc, char *entry);

/* Overwrite the secrets' bytes, then free the arrays. */
void runcfg_free(struct runcfg *rc);

#endif
