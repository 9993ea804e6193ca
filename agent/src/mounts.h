/* Console, the pseudo file systems a workload expects, and the writable
 * overlay over a read-only root. */
#ifndef VMIMG_MOUNTS_H
#define VMIMG_MOUNTS_H

#include <stddef.h>

#include "config.h"

/* Scratch mount point the image always has (vmimg/agent.py adds it): usable
 * even when the root is read-only and lacks /dev. */
#define SCRATCH_DIR "/.vmimg/mnt"

/* Open the console as fds 0, 1 and 2, mounting devtmpfs first when /dev has
 * no console node. Returns 0, or -1 when no console could be opened. */
int console_open(void);

/* Mount /proc (needed for the command line and the readiness report).
 * Returns 0 or -1 with errno. */
int mount_proc(void);

/* Put an overlay (tmpfs upper) over a read-only root, or when the config
 * asks for one, and switch into it. Returns 0 or -1 with a reason. */
int root_overlay(enum overlay_mode mode, char *err, size_t errlen);

/* Mount /sys /dev /dev/pts /dev/shm /run /tmp and cgroup2 and the /dev/fd
 * links. Returns 0, or -1 with a reason when an essential mount failed. */
int mount_all(char *err, size_t errlen);

/* Whether the root file system is writable now. */
int root_writable(void);

#endif
