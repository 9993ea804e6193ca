/* Starting the workload and supervising it as PID 1: reaping every zombie,
 * forwarding signals, noticing the workload's end. */
#ifndef VMIMG_RUN_H
#define VMIMG_RUN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct workload {
	char *const *argv;
	char *const *envp;
	const char *cwd;
	uid_t uid;
	gid_t gid;
	const unsigned *groups;
	size_t ngroups;
	int tty; /* make the console its controlling tty's foreground group */
	int null_stdin; /* stdin from /dev/null instead of the console */
	unsigned stop_timeout;
};

struct outcome {
	int code;   /* exit code, or 128 + signal */
	int signal; /* the signal that ended it, or 0 */
};

/* Block the signals PID 1 handles, so they queue for supervise(). Call early:
 * a shutdown request before the workload starts must not be lost. */
void signals_block(void);

/* Start the workload. On success returns its pid and *exec_us, the boot
 * time just before execve. On failure (chdir, user, exec) reports the error
 * marker and returns -1 with *code set (126, 127, 125). */
pid_t workload_start(const struct workload *w, uint64_t *exec_us, int *code);

/* Wait for the workload, reaping everything and forwarding signals; a stop
 * request (SIGTERM, ctrl-alt-del, power button) sends it `stop_signal`. */
struct outcome supervise(pid_t pid, unsigned stop_timeout, int stop_signal);

/* execvp with the workload's PATH (argv[0] without a slash is searched for);
 * returns the errno to report when nothing could be executed. */
int exec_search(char *const *argv, char *const *envp);

/* Drop signal dispositions and the blocked mask PID 1 set, in a child. */
void signals_reset(void);

/* Kill whatever is left and reap it. */
void kill_everything(void);

#endif
