/* What the agent tells the host: marker lines on the console (and the exit
 * report over vsock when the VM has it). Protocol in docs/agent.md:
 *   "\n@@vmimg@@ <event> key=value ...\n", values percent-escaped. */
#ifndef VMIMG_REPORT_H
#define VMIMG_REPORT_H

#include <stdint.h>

#define MARKER_PREFIX "@@vmimg@@"
#define MARKER_VERSION 1
#define VSOCK_HOST_CID 2
#define VSOCK_REPORT_PORT 7301
#define VSOCK_CONNECT_TIMEOUT_S 1

/* Exit codes the agent itself reports, following container runtimes. */
#define EXIT_AGENT_ERROR 125 /* bad config, mount failure, ... */
#define EXIT_NOT_EXECUTABLE 126
#define EXIT_NOT_FOUND 127
#define EXIT_SIGNAL_BASE 128

/* Emit "<prefix> <event>" then pairs of (key, value) until a NULL key. The
 * values are escaped; the line is written with a single write(). */
void marker(const char *event, ...);

/* The readiness report: boot time, kernel, root fs type, memory in use. */
void report_ready(uint64_t agent_start_us);

/* An error marker naming the stage, plus a plain line for people. */
void report_error(const char *stage, const char *msg);

/* An I/O error (EIO) reading the root: on a dm-verity root, a block that
 * failed its hash. The error marker with stage=integrity, the stage it
 * happened in (during=), the path being read and the message. */
void report_integrity(const char *during, const char *path, const char *msg);

/* report_error, or report_integrity when err is EIO. */
void report_failure(const char *stage, const char *path, const char *msg, int err);

/* Exit marker on the console and over vsock. */
void report_exit(int code, int signal);

/* Report an agent failure with code and power off. */
void fail(const char *stage, const char *msg, int code) __attribute__((noreturn));

/* fail, for a failure with errno err while reading `path`: an EIO is
 * reported as an integrity error. */
void fail_errno(const char *stage, const char *path, const char *msg, int code, int err)
	__attribute__((noreturn));

/* The name of the file system type with this statfs magic ("ext4"...). */
const char *fs_type_name(unsigned long magic);

#endif
