#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
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

void power_set_method(enum shutdown_method how)
{
	g_method = how;
}

/* Whether the kernel found ACPI tables (and so, on x86_64, a way to power
 * off). After an early failure /sys may not be mounted yet: then look through
 * a sysfs mounted for a moment on the scratch directory. */
static int acpi_present(void)
{
	struct stat st;
	if (stat("/sys/firmware", &st) == 0)
		return stat("/sys/" ACPI_SYSFS_DIR, &st) == 0;
	if (mount("sysfs", SCRATCH_DIR, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
		  NULL) < 0)
		return 0;
	int found = stat(SCRATCH_DIR "/" ACPI_SYSFS_DIR, &st) == 0;
	umount2(SCRATCH_DIR, MNT_DETACH);
	return found;
}

/* arm64 guests always have PSCI SYSTEM_OFF, with or without ACPI. */
#if defined(__aarch64__)
#define ALWAYS_POWERS_OFF 1
#else
#define ALWAYS_POWERS_OFF 0
#endif

static enum shutdown_method pick_method(void)
{
	if (g_method != SHUTDOWN_AUTO)
		return g_method;
	return ALWAYS_POWERS_OFF || acpi_present() ? SHUTDOWN_POWEROFF : SHUTDOWN_REBOOT;
}

void power_off(void)
{
	sync();
	/* RB_POWER_OFF does not return: without a power-off handler the kernel
	 * halts instead. So the reboot goes first whenever it is the choice. */
	if (pick_method() == SHUTDOWN_REBOOT)
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
