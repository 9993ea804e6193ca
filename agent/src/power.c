#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <unistd.h>

#include "power.h"
#include "util.h"

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
