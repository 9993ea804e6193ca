#include "cmdline.h"

#include <string.h>

#define PREFIX "vmimg."
#define KERNEL_REBOOT "reboot="

/* Cut the next word off *pos, dropping quotes; NULL when none is left. */
static char *next_word(char **pos)
{
	char *p = *pos;
	while (*p == ' ' || *p == '\t' || *p == '\n')
		p++;
	if (!*p)
		return NULL;
	char *word = p, *out = p;
	int quoted = 0;
	for (; *p; p++) {
		if (*p == '"') {
			quoted = !quoted;
			continue;
		}
		if (!quoted && (*p == ' ' || *p == '\t' || *p == '\n')) {
			p++;
			break;
		}
		*out++ = *p;
	}
	*pos = p;
	*out = '\0';
	return word;
}

static void set_param(struct bootargs *a, char *word)
{
	char *key = word + strlen(PREFIX);
	char *val = strchr(key, '=');
	if (val)
		*val++ = '\0';
	else
		val = "";
	if (!strcmp(key, "mode")) {
		if (!strcmp(val, "run"))
			a->mode = MODE_RUN;
		else if (!strcmp(val, "verify"))
			a->mode = MODE_VERIFY;
		else if (!strcmp(val, "check"))
			a->mode = MODE_CHECK;
		else if (!a->bad)
			a->bad = word;
	} else if (!strcmp(key, "shutdown")) {
		if (!strcmp(val, "auto"))
			a->shutdown = SHUTDOWN_AUTO;
		else if (!strcmp(val, "poweroff"))
			a->shutdown = SHUTDOWN_POWEROFF;
		else if (!strcmp(val, "reboot"))
			a->shutdown = SHUTDOWN_REBOOT;
		else if (!a->bad)
			a->bad = word;
	} else if (!strcmp(key, "deep")) {
		a->deep = strcmp(val, "0") != 0;
	} else if (!strcmp(key, "ip")) {
		a->ip = val;
	} else if (!strcmp(key, "gw")) {
		a->gw = val;
	} else if (!strcmp(key, "dns")) {
		a->dns = val;
	} else if (!strcmp(key, "hostname")) {
		a->hostname = val;
	} else if (!strcmp(key, "smoke")) {
		a->smoke = val;
	} else if (!strcmp(key, "cmd")) {
		a->cmd = val;
	} else if (!a->bad) {
		a->bad = word;
	}
}

void cmdline_parse(char *line, struct bootargs *args)
{
	memset(args, 0, sizeof *args);
	for (char *pos = line, *w; (w = next_word(&pos));) {
		if (!strncmp(w, PREFIX, strlen(PREFIX)))
			set_param(args, w);
		else if (!strncmp(w, KERNEL_REBOOT, strlen(KERNEL_REBOOT)))
			args->kernel_reboot = 1;
	}
}
