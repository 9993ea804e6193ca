/* vmimg init agent: PID 1 of a vmimg guest.
 *
 * Boot sequence (docs/agent.md): console, /proc, readiness marker, kernel
 * command line and config, overlay over a read-only root, the other mounts,
 * rlimits, then either verify mode (check the tree against the manifest,
 * run a smoke command) or run mode (network, exec the workload, supervise
 * it). Either way it ends with an exit marker and a power-off: PID 1 never
 * exits, since a kernel panic would lose the exit code. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmdline.h"
#include "config.h"
#include "exec.h"
#include "manifest.h"
#include "mounts.h"
#include "net.h"
#include "power.h"
#include "report.h"
#include "run.h"
#include "runcfg.h"
#include "runtime.h"
#include "util.h"
#include "verify.h"

#define NOFILE_LIMIT 1048576
#define NOFILE_FALLBACK 65536
#define ERR_LEN 512

static uint64_t g_start_us; /* boot time when the agent started */

static void finish(int code, int signal) __attribute__((noreturn));
static void finish(int code, int signal)
{
	kill_everything();
	unmount_run_disks();
	sync();
	report_exit(code, signal);
	power_off();
}

static void raise_nofile(void)
{
	struct rlimit rl = {NOFILE_LIMIT, NOFILE_LIMIT};
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
		rl.rlim_cur = rl.rlim_max = NOFILE_FALLBACK;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/* The console as our controlling tty, so the workload can be its foreground
 * process group (job control, ^C). Returns whether that worked. */
static int take_console(void)
{
	setsid();
	return ioctl(0, TIOCSCTTY, 1) == 0;
}

static void load_config(struct config *cfg)
{
	char err[ERR_LEN];
	char *text = read_file(CONFIG_PATH, NULL);
	if (!text) {
		int e = errno;
		snprintf(err, sizeof err, "cannot read %s: %s", CONFIG_PATH, strerror(e));
		fail_errno("config", CONFIG_PATH, err, EXIT_AGENT_ERROR, e);
	}
	if (config_parse(text, cfg, err, sizeof err) < 0)
		fail("config", err, EXIT_AGENT_ERROR);
	/* text stays allocated: the config's strings live in it */
}

/* Run argv as the configured user; returns the outcome. */
static struct outcome run_command(const struct config *cfg, char *const *argv, int tty)
{
	struct workload w = {
		.argv = argv,
		.envp = cfg->envp,
		.cwd = cfg->cwd,
		.uid = cfg->uid,
		.gid = cfg->gid,
		.groups = cfg->groups,
		.ngroups = cfg->ngroups,
		.tty = tty,
		.null_stdin = cfg->null_stdin,
	};
	uint64_t exec_us = 0, start_us = boot_us();
	int code = 0;
	pid_t pid = workload_start(&w, &exec_us, &code);
	if (pid < 0)
		return (struct outcome){code, 0};
	char p[16], e[24], a[24], s[24];
	snprintf(p, sizeof p, "%d", (int)pid);
	snprintf(e, sizeof e, "%llu", (unsigned long long)exec_us);
	snprintf(a, sizeof a, "%llu", (unsigned long long)(exec_us - g_start_us));
	snprintf(s, sizeof s, "%llu", (unsigned long long)(exec_us - start_us));
	marker("exec", "pid", p, "boot_us", e, "agent_us", a, "spawn_us", s, (char *)NULL);
	return supervise(pid, cfg->stop_timeout, (int)cfg->stop_signal);
}

/* Check the tree (and run the smoke command). In verify mode this ends the
 * boot; in check mode it returns when everything passed, and the workload runs. */
static void verify_mode(const struct bootargs *args, const struct config *cfg, int tty)
{
	char err[ERR_LEN];
	long problems = verify_tree(MANIFEST_PATH, args->deep, err, sizeof err);
	if (problems < 0)
		fail_errno("verify", MANIFEST_PATH, err, EXIT_AGENT_ERROR, errno);
	const char *smoke = args->smoke ? args->smoke : cfg->smoke;
	struct outcome o = {0, 0};
	if (smoke) {
		net_setup(args, args->hostname ? args->hostname : cfg->hostname, root_writable());
		char *argv[] = {"/bin/sh", "-c", (char *)smoke, NULL};
		o = run_command(cfg, argv, tty);
		char c[16];
		snprintf(c, sizeof c, "%d", o.code);
		marker("smoke", "code", c, (char *)NULL);
	}
	if (args->mode == MODE_CHECK && !problems && !o.code && !o.signal)
		return;
	finish(problems ? 1 : o.code, problems ? 0 : o.signal);
}

int main(void)
{
	uint64_t start_us = g_start_us = boot_us();
	umask(022);
	/* Before anything can fail: keep shutdown requests (ctrl-alt-del as
	 * SIGINT, not an instant reboot) until the workload can get them. */
	signals_block();
	if (console_open() < 0 && getpid() == 1)
		fail("console", "no /dev/console", EXIT_AGENT_ERROR);
	if (getpid() != 1) {
		log_msg("this is an init: boot it with init=/.vmimg/init");
		return 2;
	}
	reboot(RB_DISABLE_CAD);
	if (mount_proc() < 0)
		fail("mount", "cannot mount /proc", EXIT_AGENT_ERROR);
	report_ready(start_us);

	struct bootargs args;
	char *cmdline = read_file("/proc/cmdline", NULL);
	cmdline_parse(cmdline ? cmdline : (char[]){""}, &args);
	if (args.bad)
		log_msg("ignoring unknown parameter %s", args.bad);
	power_configure(args.shutdown, args.kernel_reboot);

	struct config cfg;
	load_config(&cfg);
	char err[ERR_LEN];
	if (root_overlay(cfg.overlay, err, sizeof err) < 0)
		fail_errno("overlay", "/", err, EXIT_AGENT_ERROR, errno);
	if (mount_all(err, sizeof err) < 0)
		fail_errno("mount", "/", err, EXIT_AGENT_ERROR, errno);
	raise_nofile();
	/* What this boot changes (vmimg run): after the mounts, which it needs
	 * (/sys and /dev to find its disk, the root's /etc/passwd), before the
	 * console and the workload, which it shapes. */
	struct runcfg rc;
	int have_rc = args.mode == MODE_RUN ? load_run_config(&rc, err, sizeof err) : 0;
	if (have_rc < 0)
		fail("runconfig", err, EXIT_AGENT_ERROR);
	if (have_rc && apply_run_config(&rc, &cfg, err, sizeof err) < 0)
		fail_errno("runconfig", "", err, EXIT_AGENT_ERROR, errno);
	int tty = take_console();
	if (have_rc) {
		console_mode(&rc);
		runcfg_free(&rc); /* the secrets' bytes are on their tmpfs now */
	}

	watch_power_button();
	if (args.mode == MODE_VERIFY || args.mode == MODE_CHECK)
		verify_mode(&args, &cfg, tty);

	net_setup(&args, args.hostname ? args.hostname : cfg.hostname, root_writable());
	exec_server_start(&cfg);
	char *shell_argv[] = {"/bin/sh", "-c", (char *)args.cmd, NULL};
	struct outcome o = run_command(&cfg, args.cmd ? shell_argv : cfg.argv, tty);
	finish(o.code, o.signal);
}
