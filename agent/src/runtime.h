/* Applying a run config in the guest: finding and reading the run disk,
 * the run-time user, volumes (9p), disks, and secrets on a tmpfs. */
#ifndef VMIMG_RUNTIME_H
#define VMIMG_RUNTIME_H

#include <stddef.h>

#include "config.h"
#include "runcfg.h"

#define SECRETS_DIR "/run/secrets"
#define MAX_RUN_DISK_BYTES (64u << 20)

/* "/dev/vdX" of the virtio disk whose serial is `serial`. Returns 0, or -1. */
int find_disk(const char *serial, char *path, size_t len);

/* Read the run disk into rc when the VM has one. Returns 1 (rc filled; its
 * text stays allocated), 0 (no run disk), or -1 with a reason in err. */
int load_run_config(struct runcfg *rc, char *err, size_t errlen);

/* Resolve `spec` in the guest's /etc/passwd and /etc/group into cfg's ids,
 * and HOME unless `keep_home`. Returns 0, or -1 with a reason in err. */
int apply_user(const char *spec, struct config *cfg, int keep_home, char *err, size_t errlen);

/* Everything of rc for the workload: argv, env, cwd, hostname, user, stdin,
 * volumes, disks, secrets. Returns 0, or -1 with a reason (and errno). */
int apply_run_config(const struct runcfg *rc, struct config *cfg, char *err, size_t errlen);

/* Unmount the disks apply_run_config mounted (the workload has ended and
 * everything is killed), so that their file systems are clean for the next
 * run: a journal left to replay would keep a read-only mount out. */
void unmount_run_disks(void);

/* The console as a plain byte stream: no echo, no signals from keys, no
 * output processing (newlines stay "\n"); canonical input stays, so that the
 * host can send end-of-file as ^D. And the terminal size when given. */
void console_mode(const struct runcfg *rc);

#endif
