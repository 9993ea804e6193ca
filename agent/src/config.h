/* The agent's config file (/.vmimg/config), written by vmimg/agent.py.
 * Format (docs/agent.md): a first line "vmimg-agent-config 1", then one
 * "key value" per line, values percent-escaped. */
#ifndef VMIMG_CONFIG_H
#define VMIMG_CONFIG_H

#include <stddef.h>

#define CONFIG_MAGIC "vmimg-agent-config"
#define CONFIG_VERSION 1
#define CONFIG_PATH "/.vmimg/config"
#define DEFAULT_STOP_TIMEOUT_S 10
#define DEFAULT_STOP_SIGNAL 15 /* SIGTERM, as container runtimes send without STOPSIGNAL */
#define MAX_SIGNAL 65          /* Linux's NSIG: signal numbers run 1..64 */
/* uid/gid values run 0..2^32-2: 2^32-1 is (uid_t)-1, "leave unchanged" to set*id(). */
#define MAX_ID 0xfffffffeULL

enum overlay_mode { OVERLAY_AUTO, OVERLAY_ALWAYS, OVERLAY_NEVER };

struct config {
	char **argv; /* NULL terminated */
	size_t argc;
	char **envp; /* NULL terminated */
	size_t envc;
	char *cwd;
	unsigned uid, gid;
	unsigned *groups;
	size_t ngroups;
	char *hostname; /* NULL: leave the kernel's */
	enum overlay_mode overlay;
	char *smoke; /* shell command for verify mode, or NULL */
	unsigned stop_timeout; /* seconds between the stop signal and SIGKILL */
	unsigned stop_signal;  /* what a stop request sends the workload (STOPSIGNAL) */
	int null_stdin;        /* not from the file: a run config without stdin (runcfg.h) */
};

/* Parse `text` (modified in place; the config's strings point into it).
 * Returns 0, or -1 with a one-line reason in err. */
int config_parse(char *text, struct config *cfg, char *err, size_t errlen);

/* Free the arrays (not the strings, which live in the text buffer). */
void config_free(struct config *cfg);

#endif
