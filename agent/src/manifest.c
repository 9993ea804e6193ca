#include "manifest.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

static int parse_u(const char *s, unsigned long long max, unsigned long long *out)
{
	return parse_uint(s, out) < 0 || *out > max ? -1 : 0;
}

static int parse_mode(const char *s, unsigned *out)
{
	unsigned v = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '7')
			return -1;
		v = v * 8 + (unsigned)(*s - '0');
		if (v > 07777)
			return -1;
	}
	*out = v;
	return 0;
}

static int is_hex64(const char *s)
{
	size_t n = strspn(s, "0123456789abcdef");
	return n == 64 && !s[n];
}

/* Fill one entry from the fields of a line; returns a reason or NULL. */
static const char *parse_entry(char **f, struct manifest_entry *e)
{
	unsigned long long v;
	memset(e, 0, sizeof *e);
	e->path = f[0];
	if (unescape(e->path) < 0 || e->path[0] != '/')
		return "bad path";
	if (strlen(f[1]) != 1 || !strchr("fdlcbps", f[1][0]))
		return "bad type";
	e->type = f[1][0];
	if (parse_mode(f[2], &e->mode) < 0)
		return "bad mode";
	if (parse_u(f[3], 0xffffffffULL, &v) < 0)
		return "bad uid";
	e->uid = (unsigned)v;
	if (parse_u(f[4], 0xffffffffULL, &v) < 0)
		return "bad gid";
	e->gid = (unsigned)v;
	if (parse_u(f[5], ~0ULL, &e->size) < 0)
		return "bad size";
	char *colon = strchr(f[6], ':');
	if (!colon)
		return "bad rdev";
	*colon = '\0';
	if (parse_u(f[6], 0xfffffULL, &v) < 0)
		return "bad rdev";
	e->rmajor = (unsigned)v;
	if (parse_u(colon + 1, 0xfffffULL, &v) < 0)
		return "bad rdev";
	e->rminor = (unsigned)v;
	if (e->type == MT_FILE) {
		if (!is_hex64(f[7]))
			return "bad sha256";
		e->sha256 = f[7];
	}
	if (e->type == MT_SYMLINK) {
		e->target = f[8];
		if (unescape(e->target) <= 0)
			return "bad link target";
	}
	return NULL;
}

/* Split a line at single spaces; -1 when it has more fields than f. */
static int split_fields(char *line, char **f)
{
	int nf = 0;
	for (char *tok = line;;) {
		if (nf == MANIFEST_FIELDS)
			return -1;
		f[nf++] = tok;
		char *sp = strchr(tok, ' ');
		if (!sp)
			return nf;
		*sp = '\0';
		tok = sp + 1;
	}
}

static int cmp_entry(const void *a, const void *b)
{
	return strcmp(((const struct manifest_entry *)a)->path,
		      ((const struct manifest_entry *)b)->path);
}

int manifest_parse(char *text, struct manifest *m, char *err, size_t errlen)
{
	memset(m, 0, sizeof *m);
	char header[64];
	snprintf(header, sizeof header, "%s %d\n", MANIFEST_MAGIC, MANIFEST_VERSION);
	if (strncmp(text, header, strlen(header)) != 0) {
		snprintf(err, errlen, "not a version %d vmimg manifest", MANIFEST_VERSION);
		return -1;
	}
	size_t cap = 0;
	int lineno = 1;
	char *pos = text + strlen(header);
	while (*pos) {
		char *line = pos;
		char *nl = strchr(line, '\n');
		if (nl) {
			*nl = '\0';
			pos = nl + 1;
		} else {
			pos = line + strlen(line);
		}
		lineno++;
		if (!line[0])
			continue;
		char *f[MANIFEST_FIELDS];
		int nf = split_fields(line, f);
		if (nf != MANIFEST_FIELDS) {
			snprintf(err, errlen, "manifest line %d: wrong number of fields, want %d", lineno,
				 MANIFEST_FIELDS);
			goto fail;
		}
		if (m->n == cap) {
			cap = cap ? cap * 2 : 256;
			struct manifest_entry *bigger = realloc(m->entries, cap * sizeof *bigger);
			if (!bigger) {
				snprintf(err, errlen, "out of memory reading the manifest");
				goto fail;
			}
			m->entries = bigger;
		}
		const char *why = parse_entry(f, &m->entries[m->n]);
		if (why) {
			snprintf(err, errlen, "manifest line %d: %s", lineno, why);
			goto fail;
		}
		m->n++;
	}
	if (m->n) /* qsort and bsearch take no NULL array, even empty */
		qsort(m->entries, m->n, sizeof *m->entries, cmp_entry);
	/* The verify walk looks each path up once: a second line for it could
	 * never be met, and would read as "missing". */
	for (size_t i = 1; i < m->n; i++) {
		if (!strcmp(m->entries[i - 1].path, m->entries[i].path)) {
			snprintf(err, errlen, "manifest lists %s twice", m->entries[i].path);
			goto fail;
		}
	}
	return 0;
fail:
	manifest_free(m);
	return -1;
}

const struct manifest_entry *manifest_find(const struct manifest *m, const char *path)
{
	struct manifest_entry key = {.path = (char *)path};
	return m->n ? bsearch(&key, m->entries, m->n, sizeof key, cmp_entry) : NULL;
}

void manifest_free(struct manifest *m)
{
	free(m->entries);
	m->entries = NULL;
	m->n = 0;
}
