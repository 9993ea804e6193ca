#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "mounts.h"
#include "power.h"
#include "util.h"

static enum shutdown_method g_method = SHUTDOWN_AUTO;
static int g_kernel_reboot; /* the command line chose the kernel's reboot= */

void power_configure(enum shutdown_method how, int kernel_reboot)
{
	g_method = how;
	g_kernel_reboot = kernel_reboot;
}

/* arm64 guests always have PSCI SYSTEM_OFF, with or without ACPI. */
#if defined(__aarch64__)
#define ALWAYS_POWERS_OFF 1
#else
#define ALWAYS_POWERS_OFF 0
#endif

/* Where sysfs can be read: /sys, or after an early failure (before /sys is
 * mounted) a sysfs mounted on the scratch directory, which *scratch says. */
static const char *sysfs_dir(int *scratch)
{
	struct stat st;
	*scratch = 0;
	if (stat("/sys/kernel", &st) == 0)
		return "/sys";
	if (mount("sysfs", SCRATCH_DIR, "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		return NULL;
	*scratch = 1;
	return SCRATCH_DIR;
}

/* Decide how to end the VM; for a reboot, make it one the VMM sees. */
static enum shutdown_method prepare(void)
{
	int scratch;
	const char *sys = sysfs_dir(&scratch);
	char path[64];
	struct stat st;
	enum shutdown_method how = g_method;
	if (how == SHUTDOWN_AUTO) {
		snprintf(path, sizeof path, "%s/%s", sys ? sys : "/sys", ACPI_SYSFS_DIR);
		how = ALWAYS_POWERS_OFF || stat(path, &st) == 0 ? SHUTDOWN_POWEROFF
								 : SHUTDOWN_REBOOT;
	}
	/* The kernel's default reset tries ACPI, the keyboard controller and the
	 * BIOS before a triple fault, and can hang on a machine with none of them
	 * (QEMU microvm without ACPI). A triple fault resets every VMM's vCPU. */
	if (how == SHUTDOWN_REBOOT && sys && !ALWAYS_POWERS_OFF && !g_kernel_reboot) {
		snprintf(path, sizeof path, "%s/%s", sys, REBOOT_TYPE_FILE);
		write_text_file(path, REBOOT_TYPE_TRIPLE, 0);
	}
	if (scratch)
		umount2(SCRATCH_DIR, MNT_DETACH);
	return how;
}

void power_off(void)
{
	sync();
	/* RB_POWER_OFF does not return: without a power-off handler the kernel
	 * halts instead. So the reboot goes first whenever it is the choice. */
	if (prepare() == SHUTDOWN_REBOOT)
		reboot(RB_AUTOBOOT);
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

#define INPUT_DIR "/dev/input"
#define EVENT_PREFIX "event"
#define MAX_INPUTS 8

/* The evdev ABI (linux/input.h, which musl's toolchain does not ship). */
struct input_event {
	struct timeval time;
	uint16_t type;
	uint16_t code;
	int32_t value;
};
#define EV_KEY 0x01
#define KEY_POWER 116
#define KEY_PRESSED 1

static int open_inputs(struct pollfd *fds)
{
	DIR *d = opendir(INPUT_DIR);
	if (!d)
		return 0;
	int n = 0;
	struct dirent *e;
	while (n < MAX_INPUTS && (e = readdir(d))) {
		if (strncmp(e->d_name, EVENT_PREFIX, strlen(EVENT_PREFIX)))
			continue;
		int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			fds[n].fd = fd;
			fds[n].events = POLLIN;
			n++;
		}
	}
	closedir(d);
	return n;
}

void watch_power_button(void)
{
	struct pollfd fds[MAX_INPUTS];
	int n = open_inputs(fds);
	if (!n)
		return;
	pid_t pid = fork();
	if (pid != 0) { /* the agent (or a failed fork): the watcher is not essential */
		for (int i = 0; i < n; i++)
			close(fds[i].fd);
		return;
	}
	prctl(PR_SET_NAME, "vmimg-power");
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (;;) {
		if (poll(fds, (nfds_t)n, -1) < 0)
			continue;
		for (int i = 0; i < n; i++) {
			struct input_event ev;
			if (!(fds[i].revents & POLLIN))
				continue;
			if (read(fds[i].fd, &ev, sizeof ev) != (ssize_t)sizeof ev)
				continue;
			if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == KEY_PRESSED)
				kill(1, SIGPWR);
		}
	}
}
