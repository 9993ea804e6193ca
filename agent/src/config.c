#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* Append to a NULL-terminated array of strings. */
static int push_str(char ***arr, size_t *n, char *s)
{
	char **bigger = realloc(*arr, (*n + 2) * sizeof **arr);
	if (!bigger)
		return -1;
	bigger[(*n)++] = s;
	bigger[*n] = NULL;
	*arr = bigger;
	return 0;
}

static int parse_id(const char *s, unsigned *out)
{
	unsigned long long v;
	if (parse_uint(s, &v) < 0 || v > MAX_ID)
		return -1;
	*out = (unsigned)v;
	return 0;
}

/* Append a supplementary gid. The value is checked before the array grows:
 * on any failure cfg->groups still owns exactly what it owned before. */
static int push_group(struct config *cfg, const char *value)
{
	unsigned g;
	if (parse_id(value, &g) < 0)
		return -1;
	unsigned *bigger = realloc(cfg->groups, (cfg->ngroups + 1) * sizeof *bigger);
	if (!bigger)
		return -1;
	cfg->groups = bigger;
	cfg->groups[cfg->ngroups++] = g;
	return 0;
}

static int check_header(char *line, char *err, size_t errlen)
{
	size_t mlen = strlen(CONFIG_MAGIC);
	unsigned long long version;
	if (!line || strncmp(line, CONFIG_MAGIC, mlen) != 0 || line[mlen] != ' ') {
		snprintf(err, errlen, "not a vmimg agent config (first line must be \"%s %d\")",
			 CONFIG_MAGIC, CONFIG_VERSION);
		return -1;
	}
	if (parse_uint(line + mlen + 1, &version) < 0 || version != CONFIG_VERSION) {
		snprintf(err, errlen, "unsupported config version \"%s\" (this agent reads %d)",
			 line + mlen + 1, CONFIG_VERSION);
		return -1;
	}
	return 0;
}

static int set_key(struct config *cfg, const char *key, char *value)
{
	if (!strcmp(key, "arg"))
		return push_str(&cfg->argv, &cfg->argc, value);
	if (!strcmp(key, "env"))
		return strchr(value, '=') ? push_str(&cfg->envp, &cfg->envc, value) : -1;
	if (!strcmp(key, "cwd")) {
		cfg->cwd = value;
		return value[0] == '/' ? 0 : -1;
	}
	if (!strcmp(key, "uid"))
		return parse_id(value, &cfg->uid);
	if (!strcmp(key, "gid"))
		return parse_id(value, &cfg->gid);
	if (!strcmp(key, "group"))
		return push_group(cfg, value);
	if (!strcmp(key, "hostname")) {
		cfg->hostname = value;
		return 0;
	}
	if (!strcmp(key, "overlay")) {
		if (!strcmp(value, "auto"))
			cfg->overlay = OVERLAY_AUTO;
		else if (!strcmp(value, "always"))
			cfg->overlay = OVERLAY_ALWAYS;
		else if (!strcmp(value, "never"))
			cfg->overlay = OVERLAY_NEVER;
		else
			return -1;
		return 0;
	}
	if (!strcmp(key, "smoke")) {
		cfg->smoke = value;
		return 0;
	}
	if (!strcmp(key, "stop_timeout"))
		return parse_id(value, &cfg->stop_timeout);
	if (!strcmp(key, "stop_signal")) {
		if (parse_id(value, &cfg->stop_signal) < 0 || !cfg->stop_signal ||
		    cfg->stop_signal >= MAX_SIGNAL)
			return -1;
		return 0;
	}
	/* Unknown keys are skipped: version 1 readers stay compatible with
	 * writers that add optional keys. */
	return 0;
}

int config_parse(char *text, struct config *cfg, char *err, size_t errlen)
{
	memset(cfg, 0, sizeof *cfg);
	cfg->cwd = "/";
	cfg->stop_timeout = DEFAULT_STOP_TIMEOUT_S;
	cfg->stop_signal = DEFAULT_STOP_SIGNAL;
	char *pos = text;
	if (check_header(next_line(&pos), err, errlen) < 0)
		return -1;
	int lineno = 1;
	for (char *line; (line = next_line(&pos));) {
		lineno++;
		if (!line[0] || line[0] == '#')
			continue;
		char *value = strchr(line, ' ');
		if (value)
			*value++ = '\0';
		else
			value = line + strlen(line); /* "key" alone: empty value */
		if (unescape(value) < 0) {
			snprintf(err, errlen, "config line %d: bad %%-escape in value of %s", lineno, line);
			goto fail;
		}
		if (set_key(cfg, line, value) < 0) {
			snprintf(err, errlen, "config line %d: bad value for %s", lineno, line);
			goto fail;
		}
	}
	if (cfg->argc == 0) {
		snprintf(err, errlen, "config has no command (no \"arg\" line)");
		goto fail;
	}
	if (!cfg->envp && push_str(&cfg->envp, &cfg->envc, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") < 0)
		goto fail;
	return 0;
fail:
	config_free(cfg);
	return -1;
}

void config_free(struct config *cfg)
{
	free(cfg->argv);
	free(cfg->envp);
	free(cfg->groups);
	cfg->argv = cfg->envp = NULL;
	cfg->groups = NULL;
	cfg->argc = cfg->envc = cfg->ngroups = 0;
}
