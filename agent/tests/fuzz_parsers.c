/* libFuzzer target for the parsers that read outside input: the config
 * (/.vmimg/config), the manifest (/.vmimg/manifest), the kernel command
 * line, the run config (the run disk, exec requests) and the guest's
 * /etc/passwd and /etc/group as run-time users read them. Built with -fsanitize=fuzzer,address,undefined by `make check`, which
 * runs it for a few seconds from the seeds in tests/fuzz-seeds.
 *
 * The first byte picks the parser ('c' config, 'm' manifest, 'k' command line,
 * 'r' run config, 'u' users; any other byte by its value mod 5), the rest is the text. Besides memory
 * errors, each parser's promises to the rest of the agent are checked: a
 * violated one aborts, which libFuzzer reports as a crash with the input. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmdline.h"
#include "config.h"
#include "manifest.h"
#include "runcfg.h"
#include "users.h"

#define ERR_LEN 512
#define SIGNAL_COUNT 64 /* Linux signals 1..64 */

#define REQUIRE(cond)                                                                   \
	do {                                                                            \
		if (!(cond)) {                                                          \
			fprintf(stderr, "%s:%d: broken promise: %s\n", __FILE__, __LINE__, \
				#cond);                                                 \
			abort();                                                        \
		}                                                                       \
	} while (0)

enum parser { CONFIG, MANIFEST, CMDLINE, RUNCFG, USERS, NPARSERS };

static enum parser pick(uint8_t b)
{
	switch (b) {
	case 'c': return CONFIG;
	case 'm': return MANIFEST;
	case 'k': return CMDLINE;
	case 'r': return RUNCFG;
	case 'u': return USERS;
	default: return (enum parser)(b % NPARSERS);
	}
}

static void fuzz_config(char *text)
{
	struct config cfg;
	char err[ERR_LEN] = "";
	if (config_parse(text, &cfg, err, sizeof err) < 0) {
		REQUIRE(err[0] != '\0');
		REQUIRE(!cfg.argv && !cfg.envp && !cfg.groups); /* freed once, nothing left */
		return;
	}
	REQUIRE(cfg.argc >= 1 && cfg.argv[cfg.argc] == NULL);
	for (size_t i = 0; i < cfg.argc; i++)
		REQUIRE(cfg.argv[i] != NULL);
	REQUIRE(cfg.envc >= 1 && cfg.envp[cfg.envc] == NULL);
	for (size_t i = 0; i < cfg.envc; i++)
		REQUIRE(strchr(cfg.envp[i], '=') != NULL);
	REQUIRE(cfg.cwd[0] == '/');
	REQUIRE(cfg.uid <= MAX_ID && cfg.gid <= MAX_ID && cfg.stop_timeout <= MAX_ID);
	for (size_t i = 0; i < cfg.ngroups; i++)
		REQUIRE(cfg.groups[i] <= MAX_ID);
	REQUIRE(cfg.stop_signal >= 1 && cfg.stop_signal <= SIGNAL_COUNT);
	config_free(&cfg);
}

static void fuzz_manifest(char *text)
{
	struct manifest m;
	char err[ERR_LEN] = "";
	if (manifest_parse(text, &m, err, sizeof err) < 0) {
		REQUIRE(err[0] != '\0' && m.entries == NULL && m.n == 0);
		return;
	}
	for (size_t i = 0; i < m.n; i++) {
		const struct manifest_entry *e = &m.entries[i];
		REQUIRE(e->path[0] == '/');
		REQUIRE(strchr("fdlcbps", e->type) && e->type != '\0');
		REQUIRE(e->mode <= 07777);
		REQUIRE((e->type == MT_FILE) == (e->sha256 != NULL));
		REQUIRE(!e->sha256 || strlen(e->sha256) == 64);
		REQUIRE((e->type == MT_SYMLINK) == (e->target != NULL));
		REQUIRE(!e->target || e->target[0] != '\0');
		/* sorted, one entry per path, and every path found again */
		REQUIRE(i == 0 || strcmp(m.entries[i - 1].path, e->path) < 0);
		REQUIRE(manifest_find(&m, e->path) == e);
	}
	manifest_free(&m);
}

/* A parsed value points into the line (or is the empty literal) and holds no quote. */
static void check_value(const char *v, const char *line, size_t len)
{
	if (!v || !v[0])
		return;
	REQUIRE(v >= line && v < line + len);
	REQUIRE(strchr(v, '"') == NULL);
}

static void fuzz_cmdline(char *line, size_t len)
{
	struct bootargs a;
	cmdline_parse(line, &a);
	REQUIRE(a.mode == MODE_RUN || a.mode == MODE_VERIFY || a.mode == MODE_CHECK);
	REQUIRE(a.shutdown == SHUTDOWN_AUTO || a.shutdown == SHUTDOWN_POWEROFF ||
		a.shutdown == SHUTDOWN_REBOOT);
	const char *values[] = {a.ip, a.gw, a.dns, a.hostname, a.smoke, a.cmd, a.bad};
	for (size_t i = 0; i < sizeof values / sizeof values[0]; i++)
		check_value(values[i], line, len);
	REQUIRE(!a.bad || !strncmp(a.bad, "vmimg.", 6));
}

static void fuzz_runcfg(char *text, size_t len)
{
	struct runcfg rc;
	char err[ERR_LEN] = "";
	if (runcfg_parse(text, &rc, err, sizeof err) < 0) {
		REQUIRE(err[0] != '\0' && !rc.argv && !rc.env && !rc.nsecrets && !rc.nmounts);
		return;
	}
	REQUIRE(!rc.argv || rc.argv[rc.argc] == NULL);
	for (size_t i = 0; i < rc.envc; i++)
		REQUIRE(strchr(rc.env[i], '=') > rc.env[i]);
	REQUIRE(!rc.cwd || rc.cwd[0] == '/');
	REQUIRE(rc.tty >= -1 && rc.tty <= 1 && rc.stdin_open >= -1 && rc.stdin_open <= 1);
	REQUIRE(rc.nmounts <= MAX_RUN_MOUNTS && rc.nsecrets <= MAX_SECRETS);
	REQUIRE(rc.stop_timeout >= -1 && rc.stop_timeout <= (long)MAX_ID);
	REQUIRE(rc.stop_signal < SIGNAL_COUNT + 1);
	for (size_t i = 0; i < rc.nmounts; i++) {
		const struct run_mount *m = &rc.mounts[i];
		REQUIRE(m->source[0] && (m->target[0] == '/' || (!m->target[0] && m->kind == RM_DISK)));
		REQUIRE(!strstr(m->target, "/../") && strcmp(m->target, "/"));
	}
	for (size_t i = 0; i < rc.nsecrets; i++) {
		const struct secret *s = &rc.secrets[i];
		REQUIRE(s->len <= MAX_SECRET_BYTES && !strchr(s->name, '/') && s->name[0]);
		REQUIRE(s->data >= text && s->data + s->len <= text + len);
	}
	runcfg_free(&rc);
}

/* The text is both files: /etc/passwd up to the first blank line, /etc/group after. */
static void fuzz_users(char *text)
{
	char *group = strstr(text, "\n\n");
	if (group)
		*group++ = '\0';
	const char *specs[] = {"root", "0", "app", "1000:50", "app:staff", "x:y"};
	for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
		struct user_ids u;
		char err[ERR_LEN] = "";
		if (resolve_user(specs[i], text, group, &u, err, sizeof err) < 0) {
			REQUIRE(err[0] != '\0');
			continue;
		}
		REQUIRE(u.uid <= MAX_ID && u.gid <= MAX_ID && u.ngroups <= MAX_USER_GROUPS);
		REQUIRE(u.home[0] != '\0');
		for (size_t g = 0; g < u.ngroups; g++)
			REQUIRE(u.groups[g] <= MAX_ID && u.groups[g] != u.gid);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0)
		return 0;
	/* An exact-size copy: reading one byte past the text is caught. The
	 * parsers take C strings, as read_file hands them over. */
	size_t len = size - 1;
	char *text = malloc(len + 1);
	if (!text)
		return 0;
	memcpy(text, data + 1, len);
	text[len] = '\0';
	switch (pick(data[0])) {
	case CONFIG: fuzz_config(text); break;
	case MANIFEST: fuzz_manifest(text); break;
	case RUNCFG: fuzz_runcfg(text, len); break;
	case USERS: fuzz_users(text); break;
	default: fuzz_cmdline(text, len); break;
	}
	free(text);
	return 0;
}
