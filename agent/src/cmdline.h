/* The vmimg.* parameters on the kernel command line. The kernel keeps dotted
 * parameters away from init's argv and environment, so the agent reads them
 * from /proc/cmdline. */
#ifndef VMIMG_CMDLINE_H
#define VMIMG_CMDLINE_H

/* run: the workload; verify: check the tree (and smoke), power off;
 * check: verify, smoke, and then, when all passed, run the workload. */
enum agent_mode { MODE_RUN, MODE_VERIFY, MODE_CHECK };

/* How the VM ends (power.c): auto picks power-off when the platform has a way
 * to power off (ACPI, PSCI), else a reboot, which the VMM turns into an exit. */
enum shutdown_method { SHUTDOWN_AUTO, SHUTDOWN_POWEROFF, SHUTDOWN_REBOOT };

struct bootargs {
	enum agent_mode mode; /* vmimg.mode=run|verify|check */
	int deep;             /* vmimg.deep=1: hash file content in verify mode */
	enum shutdown_method shutdown; /* vmimg.shutdown=auto|poweroff|reboot */
	int kernel_reboot;    /* the kernel's own reboot= is there (its reset method) */
	const char *ip;       /* vmimg.ip=10.0.2.15/24: configure eth0 */
	const char *gw;       /* vmimg.gw=10.0.2.2: default route */
	const char *dns;      /* vmimg.dns=10.0.2.3: /etc/resolv.conf */
	const char *hostname; /* vmimg.hostname=name: overrides the config */
	const char *smoke;    /* vmimg.smoke="cmd": verify mode smoke command */
	const char *cmd;      /* vmimg.cmd="cmd": run this shell command instead */
	const char *bad;      /* first vmimg.* parameter we could not understand */
};

/* Parse a command line (modified in place; results point into it). Double
 * quotes group words, as the kernel's own parser does, and are removed. */
void cmdline_parse(char *line, struct bootargs *args);

#endif
