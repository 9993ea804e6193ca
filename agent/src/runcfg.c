#include "runcfg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

#define MAX_FIELDS 4

/* Cut a line into fields at single spaces and unescape each. Returns the
 * number of fields, or -1 for too many fields or a bad escape. */
static int split_fields(char *line, char **f)
{
	int n = 0;
	for (char *p = line;; n++) {
		if (n == MAX_FIELDS)
			return -1;
		f[n] = p;
		char *sp = strchr(p, ' ');
		if (sp)
			*sp = '\0';
		if (unescape(f[n]) < 0)
			return -1;
		if (!sp)
			return n + 1;
		p = sp + 1;
	}
}

static int push(char ***arr, size_t *n, char *s)
{
	char **bigger = realloc(*arr, (*n + 2) * sizeof **arr);
	if (!bigger)
		return -1;
	bigger[(*n)++] = s;
	bigger[*n] = NULL;
	*arr = bigger;
	return 0;
}

int env_set(char ***envp, size_t *envc, char *entry)
{
	size_t keylen = (size_t)(strchr(entry, '=') - entry);
	for (size_t i = 0; i < *envc; i++) {
		if (!strncmp((*envp)[i], entry, keylen + 1)) {
			(*envp)[i] = entry;
			return 0;
		}
	}
	return push(envp, envc, entry);
}

/* An absolute path without "." or ".." parts, and not "/" itself. */
static int good_target(const char *p)
{
	if (p[0] != '/' || !p[1])
		return 0;
	for (const char *s = p; *s; s++) {
		if (*s != '/')
			continue;
		const char *part = s + 1;
		size_t len = strcspn(part, "/");
		if ((len == 1 && part[0] == '.') || (len == 2 && part[0] == '.' && part[1] == '.'))
			return 0;
	}
	return 1;
}

static int good_secret_name(const char *name)
{
	size_t len = strlen(name);
	if (!len || len > MAX_SECRET_NAME || !strcmp(name, ".") || !strcmp(name, ".."))
		return 0;
	return strspn(name, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") ==
	       len;
}

/* Decode hex in place; the length in bytes, or -1. */
static long hex_decode(char *s)
{
	size_t n = strlen(s);
	if (n % 2)
		return -1;
	for (size_t i = 0; i < n; i += 2) {
		int hi = hex_digit(s[i]), lo = hex_digit(s[i + 1]);
		if (hi < 0 || lo < 0)
			return -1;
		s[i / 2] = (char)(hi << 4 | lo);
	}
	return (long)(n / 2);
}

static int parse_flag(const char *v, int *out)
{
	if (strcmp(v, "0") && strcmp(v, "1"))
		return -1;
	*out = v[0] == '1';
	return 0;
}

static int parse_size(const char *v, unsigned *out)
{
	unsigned long long n;
	if (parse_uint(v, &n) < 0 || n == 0 || n > MAX_WINSIZE)
		return -1;
	*out = (unsigned)n;
	return 0;
}

static int parse_mode(const char *v, enum run_mount_mode *out)
{
	if (!strcmp(v, "ro"))
		*out = RM_RO;
	else if (!strcmp(v, "rw"))
		*out = RM_RW;
	else if (!strcmp(v, "data"))
		*out = RM_DATA;
	else
		return -1;
	return 0;
}

/* volume TAG PATH MODE | disk SERIAL PATH MODE (PATH "" for a disk: not mounted). */
static int add_mount(struct runcfg *rc, enum run_mount_kind kind, char **f, int n)
{
	if (n != 4 || rc->nmounts == MAX_RUN_MOUNTS || !f[1][0])
		return -1;
	struct run_mount *m = &rc->mounts[rc->nmounts];
	m->kind = kind;
	m->source = f[1];
	m->target = f[2];
	if (parse_mode(f[3], &m->mode) < 0)
		return -1;
	if (!(kind == RM_DISK && !f[2][0]) && !good_target(f[2]))
		return -1;
	if (kind == RM_VOLUME && m->mode == RM_DATA)
		return -1;
	rc->nmounts++;
	return 0;
}

static int add_secret(struct runcfg *rc, char **f, int n)
{
	if (n != 3 || rc->nsecrets == MAX_SECRETS || !good_secret_name(f[1]))
		return -1;
	for (size_t i = 0; i < rc->nsecrets; i++)
		if (!strcmp(rc->secrets[i].name, f[1]))
			return -1;
	long len = hex_decode(f[2]);
	if (len < 0 || len > MAX_SECRET_BYTES)
		return -1;
	rc->secrets[rc->nsecrets++] = (struct secret){f[1], f[2], (size_t)len};
	return 0;
}

/* A key with one value; -1 when its value is bad, 1 when the key is not one of these. */
static int set_single(struct runcfg *rc, const char *key, char *v)
{
	if (!strcmp(key, "arg"))
		return push(&rc->argv, &rc->argc, v);
	if (!strcmp(key, "env"))
		return strchr(v, '=') && v[0] != '=' ? push(&rc->env, &rc->envc, v) : -1;
	if (!strcmp(key, "cwd")) {
		rc->cwd = v;
		return v[0] == '/' ? 0 : -1;
	}
	if (!strcmp(key, "user")) {
		rc->user = v;
		return v[0] ? 0 : -1;
	}
	if (!strcmp(key, "hostname")) {
		rc->hostname = v;
		return 0;
	}
	if (!strcmp(key, "tty"))
		return parse_flag(v, &rc->tty);
	if (!strcmp(key, "stdin"))
		return parse_flag(v, &rc->stdin_open);
	if (!strcmp(key, "rows"))
		return parse_size(v, &rc->rows);
	if (!strcmp(key, "cols"))
		return parse_size(v, &rc->cols);
	unsigned long long n;
	if (!strcmp(key, "stop_timeout")) {
		if (parse_uint(v, &n) < 0 || n > MAX_ID)
			return -1;
		rc->stop_timeout = (long)n;
		return 0;
	}
	if (!strcmp(key, "stop_signal")) {
		if (parse_uint(v, &n) < 0 || !n || n >= MAX_SIGNAL)
			return -1;
		rc->stop_signal = (unsigned)n;
		return 0;
	}
	return 1;
}

static const char *const single_keys[] = {"arg",   "env",  "cwd",  "user",         "hostname",
					  "tty",   "stdin", "rows", "cols", "stop_timeout", "stop_signal"};

static int set_key(struct runcfg *rc, char **f, int n)
{
	const char *key = f[0];
	if (!strcmp(key, "volume"))
		return add_mount(rc, RM_VOLUME, f, n);
	if (!strcmp(key, "disk"))
		return add_mount(rc, RM_DISK, f, n);
	if (!strcmp(key, "secret"))
		return add_secret(rc, f, n);
	for (size_t i = 0; i < sizeof single_keys / sizeof single_keys[0]; i++)
		if (!strcmp(key, single_keys[i]))
			return n == 2 ? set_single(rc, key, f[1]) : -1;
	return 0; /* unknown keys: later writers may add optional ones */
}

int runcfg_parse(char *text, struct runcfg *rc, char *err, size_t errlen)
{
	memset(rc, 0, sizeof *rc);
	rc->tty = rc->stdin_open = -1;
	rc->stop_timeout = -1;
	char *pos = text;
	char *head = next_line(&pos);
	size_t mlen = strlen(RUNCFG_MAGIC);
	unsigned long long version;
	if (!head || strncmp(head, RUNCFG_MAGIC, mlen) || head[mlen] != ' ' ||
	    parse_uint(head + mlen + 1, &version) < 0 || version != RUNCFG_VERSION) {
		snprintf(err, errlen, "not a version %d run config", RUNCFG_VERSION);
		goto fail;
	}
	int lineno = 1;
	for (char *line; (line = next_line(&pos));) {
		lineno++;
		if (!line[0] || line[0] == '#')
			continue;
		char *f[MAX_FIELDS];
		int n = split_fields(line, f);
		/* The key alone names the line: a value may be a secret. */
		if (n < 0 || set_key(rc, f, n) < 0) {
			snprintf(err, errlen, "run config line %d: bad %.32s line", lineno, f[0]);
			goto fail;
		}
	}
	return 0;
fail:
	runcfg_free(rc);
	return -1;
}

int runcfg_apply(const struct runcfg *rc, struct config *cfg)
{
	if (rc->argc) {
		char **argv = malloc((rc->argc + 1) * sizeof *argv);
		if (!argv)
			return -1;
		memcpy(argv, rc->argv, (rc->argc + 1) * sizeof *argv);
		free(cfg->argv);
		cfg->argv = argv;
		cfg->argc = rc->argc;
	}
	for (size_t i = 0; i < rc->envc; i++)
		if (env_set(&cfg->envp, &cfg->envc, rc->env[i]) < 0)
			return -1;
	if (rc->cwd)
		cfg->cwd = rc->cwd;
	if (rc->hostname)
		cfg->hostname = rc->hostname;
	if (rc->stop_timeout >= 0)
		cfg->stop_timeout = (unsigned)rc->stop_timeout;
	if (rc->stop_signal)
		cfg->stop_signal = rc->stop_signal;
	return 0;
}

void runcfg_free(struct runcfg *rc)
{
	for (size_t i = 0; i < rc->nsecrets; i++) {
		/* the decoded bytes and the rest of their hex text */
		volatile char *p = rc->secrets[i].data;
		for (size_t j = 0; j < 2 * rc->secrets[i].len; j++)
			p[j] = 0;
	}
	free(rc->argv);
	free(rc->env);
	rc->argv = rc->env = NULL;
	rc->argc = rc->envc = rc->nsecrets = rc->nmounts = 0;
}
