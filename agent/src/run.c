#define _GNU_SOURCE
#include "run.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "report.h"
#include "util.h"

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Signals PID 1 takes from the kernel or the host: SIGINT is ctrl-alt-del
 * (with reboot(RB_DISABLE_CAD)), SIGPWR a power event. */
static const int handled[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGPWR};
#define NHANDLED (sizeof handled / sizeof handled[0])

static void ignore(int sig) { (void)sig; }

static void handled_set(sigset_t *set)
{
	sigemptyset(set);
	for (size_t i = 0; i < NHANDLED; i++)
		sigaddset(set, handled[i]);
}

void signals_block(void)
{
	sigset_t set;
	handled_set(&set);
	sigprocmask(SIG_BLOCK, &set, NULL);
	/* The kernel drops signals to init that have no handler; blocking
	 * already keeps them, a handler makes sure of it. */
	struct sigaction sa = {.sa_handler = ignore};
	for (size_t i = 0; i < NHANDLED; i++)
		sigaction(handled[i], &sa, NULL);
}

/* What the child tells the parent through the exec pipe. */
struct exec_report {
	uint64_t exec_us; /* boot time just before execve */
	int stage;        /* 0: exec ok so far; else an error stage */
	int err;          /* errno */
};

enum { STAGE_OK, STAGE_CWD, STAGE_USER, STAGE_EXEC, NSTAGES };
static const char *const stage_names[NSTAGES] = {"ok", "cwd", "user", "exec"};

static const char *env_get(char *const *envp, const char *name)
{
	size_t n = strlen(name);
	for (; *envp; envp++)
		if (!strncmp(*envp, name, n) && (*envp)[n] == '=')
			return *envp + n + 1;
	return NULL;
}

int exec_search(char *const *argv, char *const *envp)
{
	if (strchr(argv[0], '/')) {
		execve(argv[0], argv, envp);
		return errno;
	}
	const char *path = env_get(envp, "PATH");
	if (!path)
		path = DEFAULT_PATH;
	int seen_eacces = 0;
	char full[4096];
	for (const char *p = path;; p++) {
		const char *end = strchrnul(p, ':');
		int dirlen = (int)(end - p);
		snprintf(full, sizeof full, "%.*s%s%s", dirlen, p, dirlen ? "/" : "", argv[0]);
		execve(full, argv, envp);
		if (errno == EACCES)
			seen_eacces = 1;
		else if (errno != ENOENT && errno != ENOTDIR)
			return errno;
		if (!*end)
			break;
		p = end;
	}
	return seen_eacces ? EACCES : ENOENT;
}

void signals_reset(void)
{
	sigset_t none;
	sigemptyset(&none);
	for (size_t i = 0; i < NHANDLED; i++)
		signal(handled[i], SIG_DFL);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

static void child(const struct workload *w, int fd)
{
	struct exec_report r = {0};
	sigset_t none;
	sigemptyset(&none);
	for (size_t i = 0; i < NHANDLED; i++)
		signal(handled[i], SIG_DFL);
	setpgid(0, 0);
	if (w->tty) {
		/* Become the console's foreground group; SIGTTOU is what a
		 * background group gets for asking, so ignore it meanwhile. */
		signal(SIGTTOU, SIG_IGN);
		tcsetpgrp(0, getpid());
		signal(SIGTTOU, SIG_DFL);
	}
	if (w->null_stdin) {
		int null = open("/dev/null", O_RDONLY);
		if (null > 0) {
			dup2(null, 0);
			close(null);
		}
	}
	sigprocmask(SIG_SETMASK, &none, NULL);
	if (chdir(w->cwd) < 0 && errno == ENOENT)
		make_dirs(w->cwd);
	r.stage = STAGE_USER;
	gid_t groups[64];
	size_t ng = w->ngroups < 64 ? w->ngroups : 64;
	for (size_t i = 0; i < ng; i++)
		groups[i] = w->groups[i];
	if (setgroups(ng, groups) < 0 || setgid(w->gid) < 0 || setuid(w->uid) < 0)
		goto out;
	r.stage = STAGE_CWD;
	if (chdir(w->cwd) < 0)
		goto out;
	r.stage = STAGE_EXEC;
	r.exec_us = boot_us();
	write_all(fd, &r.exec_us, sizeof r.exec_us);
	r.err = exec_search(w->argv, w->envp);
	write_all(fd, &r.stage, sizeof r.stage);
	write_all(fd, &r.err, sizeof r.err);
	_exit(r.err == ENOENT ? EXIT_NOT_FOUND : EXIT_NOT_EXECUTABLE);
out:
	r.err = errno;
	r.exec_us = boot_us();
	write_all(fd, &r.exec_us, sizeof r.exec_us);
	write_all(fd, &r.stage, sizeof r.stage);
	write_all(fd, &r.err, sizeof r.err);
	_exit(EXIT_AGENT_ERROR);
}

static size_t read_full(int fd, void *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t r = read(fd, (char *)buf + got, len - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		got += (size_t)r;
	}
	return got;
}

pid_t workload_start(const struct workload *w, uint64_t *exec_us, int *code)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0) {
		*code = EXIT_AGENT_ERROR;
		report_error("exec", "pipe failed");
		return -1;
	}
	pid_t pid = fork();
	if (pid == 0) {
		close(p[0]);
		child(w, p[1]);
	}
	close(p[1]);
	if (pid < 0) {
		close(p[0]);
		*code = EXIT_AGENT_ERROR;
		report_error("exec", strerror(errno));
		return -1;
	}
	/* The pipe closes on a successful execve (CLOEXEC); otherwise the
	 * child wrote the failing stage and errno first. */
	struct exec_report r = {0};
	read_full(p[0], &r.exec_us, sizeof r.exec_us);
	size_t more = read_full(p[0], &r.stage, sizeof r.stage);
	read_full(p[0], &r.err, sizeof r.err);
	close(p[0]);
	*exec_us = r.exec_us;
	if (more == 0)
		return pid;
	char msg[512];
	int status;
	waitpid(pid, &status, 0);
	if (r.stage == STAGE_EXEC) {
		*code = r.err == ENOENT ? EXIT_NOT_FOUND : EXIT_NOT_EXECUTABLE;
		snprintf(msg, sizeof msg, "cannot execute %s: %s", w->argv[0], strerror(r.err));
	} else {
		*code = EXIT_AGENT_ERROR;
		if (r.stage == STAGE_CWD)
			snprintf(msg, sizeof msg, "cannot enter working directory %s: %s", w->cwd,
				 strerror(r.err));
		else
			snprintf(msg, sizeof msg, "cannot switch to uid %u gid %u: %s",
				 (unsigned)w->uid, (unsigned)w->gid, strerror(r.err));
	}
	const char *path = r.stage == STAGE_EXEC ? w->argv[0] : w->cwd;
	report_failure(stage_names[r.stage > 0 && r.stage < NSTAGES ? r.stage : 0], path, msg,
		       r.stage == STAGE_USER ? 0 : r.err);
	log_msg("%s", msg);
	return -1;
}

static void reap(pid_t pid, int *done, int *status)
{
	int st;
	pid_t p;
	while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
		if (p == pid) {
			*done = 1;
			*status = st;
		}
	}
}

struct outcome supervise(pid_t pid, unsigned stop_timeout, int stop_signal)
{
	sigset_t set;
	handled_set(&set);
	int done = 0, status = 0;
	uint64_t kill_at = 0; /* boot time to SIGKILL a workload asked to stop */
	reap(pid, &done, &status);
	while (!done) {
		siginfo_t info;
		int sig;
		if (kill_at) {
			uint64_t now = boot_us();
			uint64_t left = kill_at > now ? kill_at - now : 0;
			struct timespec ts = {.tv_sec = (time_t)(left / 1000000),
					      .tv_nsec = (long)(left % 1000000) * 1000};
			sig = sigtimedwait(&set, &info, &ts);
			if (sig < 0 && errno == EAGAIN) {
				kill(-pid, SIGKILL);
				kill(pid, SIGKILL);
				kill_at = 0;
				continue;
			}
		} else {
			sig = sigwaitinfo(&set, &info);
		}
		if (sig < 0)
			continue;
		if (sig == SIGCHLD) {
			reap(pid, &done, &status);
			continue;
		}
		/* A stop request (SIGTERM, ctrl-alt-del's SIGINT, SIGPWR) reaches
		 * the workload as its stop signal; the others pass as they are. */
		int stop = sig == SIGTERM || sig == SIGINT || sig == SIGPWR;
		int fwd = stop ? stop_signal : sig;
		char name[16], to[16];
		snprintf(name, sizeof name, "%d", sig);
		snprintf(to, sizeof to, "%d", fwd);
		marker("signal", "received", name, "forwarded", to, (char *)NULL);
		if (kill(-pid, fwd) < 0)
			kill(pid, fwd);
		if (stop && !kill_at)
			kill_at = boot_us() + (uint64_t)stop_timeout * 1000000;
	}
	struct outcome o = {0, 0};
	if (WIFEXITED(status)) {
		o.code = WEXITSTATUS(status);
	} else if (WIFSIGNALED(status)) {
		o.signal = WTERMSIG(status);
		o.code = EXIT_SIGNAL_BASE + o.signal;
	}
	return o;
}

void kill_everything(void)
{
	kill(-1, SIGKILL);
	while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
		;
}
