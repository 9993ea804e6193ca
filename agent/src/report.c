#define _GNU_SOURCE
#include "report.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <sys/time.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "power.h"
#include "util.h"

#define MARKER_MAX 1024

/* From <linux/vm_sockets.h>, which musl's headers do not carry. */
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#define SO_VM_SOCKETS_CONNECT_TIMEOUT 6
struct vsock_addr {
	sa_family_t family;
	unsigned short reserved;
	unsigned int port;
	unsigned int cid;
	unsigned char zero[sizeof(struct sockaddr) - sizeof(sa_family_t) - sizeof(unsigned short) -
			   2 * sizeof(unsigned int)];
};

static int count_pairs(va_list ap)
{
	int n = 0;
	while (va_arg(ap, const char *)) {
		va_arg(ap, const char *);
		n++;
	}
	return n;
}

/* Room kept per key on the line for " key=" (keys are short words). */
#define MARKER_KEY_ROOM 24

/* A value too long for the line (a deep path, a long argv[0]) is cut to its
 * share of the room left, so that every later field still fits. */
static int vmarker(char *line, size_t cap, const char *event, va_list ap)
{
	va_list count;
	va_copy(count, ap);
	int left = count_pairs(count);
	va_end(count);
	snprintf(line, cap, "\n%s %s", MARKER_PREFIX, event);
	for (const char *key; (key = va_arg(ap, const char *)); left--) {
		const char *val = va_arg(ap, const char *);
		size_t n = strlen(line);
		snprintf(line + n, cap - n, " %s=", key);
		n = strlen(line);
		size_t room = cap - 1 - n; /* one byte for the final newline */
		size_t later = (size_t)(left - 1) * MARKER_KEY_ROOM;
		size_t share = room > later ? (room - later) / (size_t)left : 0;
		escape_append(line, n + share + 1, val ? val : ""); /* cut when too long */
	}
	size_t n = strlen(line);
	line[n++] = '\n';
	line[n] = '\0';
	return (int)n;
}

void marker(const char *event, ...)
{
	char line[MARKER_MAX];
	va_list ap;
	va_start(ap, event);
	int n = vmarker(line, sizeof line - 1, event, ap);
	va_end(ap);
	write_all(g_console_fd, line, (size_t)n);
}

static struct {
	unsigned long magic;
	const char *name;
} const fs_names[] = {
	{0x858458f6, "ramfs"},   {0x01021994, "tmpfs"},    {0xef53, "ext4"},
	{0xe0f5e1e2, "erofs"},   {0x794c7630, "overlay"},  {0x73717368, "squashfs"},
	{0x9123683e, "btrfs"},   {0x58465342, "xfs"},      {0x6969, "nfs"},
	{0x01021997, "9p"},      {0x65735546, "fuse"},     {0x9660, "iso9660"},
};

const char *fs_type_name(unsigned long magic)
{
	for (size_t i = 0; i < sizeof fs_names / sizeof fs_names[0]; i++)
		if (fs_names[i].magic == magic)
			return fs_names[i].name;
	return "unknown";
}

static long long meminfo_kb(const char *text, const char *key)
{
	const char *p = strstr(text, key);
	return p ? strtoll(p + strlen(key), NULL, 10) : -1;
}

/* MemTotal - MemAvailable from /proc/meminfo, in KiB; -1 when unknown. */
static long long mem_used_kb(void)
{
	char *text = read_file("/proc/meminfo", NULL);
	if (!text)
		return -1;
	long long total = meminfo_kb(text, "MemTotal:");
	long long avail = meminfo_kb(text, "MemAvailable:");
	free(text);
	return total < 0 || avail < 0 ? -1 : total - avail;
}

void report_ready(uint64_t agent_start_us)
{
	char start[24], mem[24], version[8];
	struct utsname u;
	struct statfs sf;
	if (uname(&u) < 0)
		strcpy(u.release, "unknown");
	const char *rootfs = statfs("/", &sf) == 0 ? fs_type_name((unsigned long)sf.f_type) : "unknown";
	snprintf(start, sizeof start, "%llu", (unsigned long long)agent_start_us);
	snprintf(mem, sizeof mem, "%lld", mem_used_kb());
	snprintf(version, sizeof version, "%d", MARKER_VERSION);
	marker("ready", "version", version, "boot_us", start, "kernel", u.release, "rootfs", rootfs,
	       "mem_used_kb", mem, (char *)NULL);
}

void report_error(const char *stage, const char *msg)
{
	marker("error", "stage", stage, "msg", msg, (char *)NULL);
}

void report_integrity(const char *during, const char *path, const char *msg)
{
	marker("error", "stage", "integrity", "during", during, "path", path, "msg", msg,
	       (char *)NULL);
}

void report_failure(const char *stage, const char *path, const char *msg, int err)
{
	if (err == EIO)
		report_integrity(stage, path, msg);
	else
		report_error(stage, msg);
}

/* Send the exit line to the host over vsock; silent when there is none. */
static void vsock_send(const char *line, size_t len)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	struct timeval tv = {.tv_sec = VSOCK_CONNECT_TIMEOUT_S};
	setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
	struct vsock_addr addr = {
		.family = AF_VSOCK,
		.cid = VSOCK_HOST_CID,
		.port = VSOCK_REPORT_PORT,
	};
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
		write_all(fd, line, len);
	close(fd);
}

void report_exit(int code, int signal)
{
	char c[16], s[16], line[MARKER_MAX];
	snprintf(c, sizeof c, "%d", code);
	snprintf(s, sizeof s, "%d", signal);
	if (signal)
		snprintf(line, sizeof line, "\n%s exit code=%s signal=%s\n", MARKER_PREFIX, c, s);
	else
		snprintf(line, sizeof line, "\n%s exit code=%s\n", MARKER_PREFIX, c);
	write_all(g_console_fd, line, strlen(line));
	vsock_send(line + 1, strlen(line + 1));
}

void fail_errno(const char *stage, const char *path, const char *msg, int code, int err)
{
	report_failure(stage, path, msg, err);
	log_msg("%s: %s", stage, msg);
	report_exit(code, 0);
	power_off();
}

void fail(const char *stage, const char *msg, int code)
{
	fail_errno(stage, "", msg, code, 0);
}
