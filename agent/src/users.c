#include "users.h"

#include <stdio.h>
#include <string.h>

#include "config.h"
#include "util.h"

#define LINE_MAX_LEN 4096
#define MAX_COLS 8
#define PASSWD_COLS 7
#define GROUP_COLS 4
#define NAME_MAX_LEN 256

/* One line of a colon file: a copy cut into columns. */
struct row {
	char buf[LINE_MAX_LEN];
	char *col[MAX_COLS];
	int n;
};

/* Copy the line at *pos into r and split it; advances *pos. 0 at the end. */
static int next_row(const char **pos, struct row *r)
{
	const char *p = *pos;
	if (!p || !*p)
		return 0;
	size_t len = strcspn(p, "\n");
	*pos = p[len] ? p + len + 1 : p + len;
	size_t keep = len < LINE_MAX_LEN - 1 ? len : LINE_MAX_LEN - 1;
	memcpy(r->buf, p, keep);
	r->buf[keep] = '\0';
	r->n = 0;
	for (char *c = r->buf; r->n < MAX_COLS;) {
		r->col[r->n++] = c;
		char *colon = strchr(c, ':');
		if (!colon)
			break;
		*colon = '\0';
		c = colon + 1;
	}
	return 1;
}

static int parse_id(const char *s, unsigned *out)
{
	unsigned long long v;
	if (parse_uint(s, &v) < 0 || v > MAX_ID)
		return -1;
	*out = (unsigned)v;
	return 0;
}

/* The passwd row whose name (or, with by_uid, uid) matches. */
static int find_passwd(const char *text, const char *name, unsigned uid, int by_uid,
		       struct row *r)
{
	unsigned u, g;
	for (const char *pos = text; next_row(&pos, r);) {
		if (r->n < PASSWD_COLS || parse_id(r->col[2], &u) < 0 || parse_id(r->col[3], &g) < 0)
			continue;
		if (by_uid ? u == uid : !strcmp(r->col[0], name))
			return 1;
	}
	return 0;
}

static int find_group(const char *text, const char *name, unsigned *gid)
{
	struct row r;
	for (const char *pos = text; next_row(&pos, &r);)
		if (r.n >= GROUP_COLS && !strcmp(r.col[0], name) && parse_id(r.col[2], gid) == 0)
			return 1;
	return 0;
}

/* Whether a group's member list (comma-separated) names `user`. */
static int lists(const char *members, const char *user)
{
	size_t n = strlen(user);
	for (const char *p = members; *p;) {
		size_t len = strcspn(p, ",");
		if (len == n && !strncmp(p, user, n))
			return 1;
		p += len + (p[len] == ',');
	}
	return 0;
}

static void supplementary(const char *text, const char *user, struct user_ids *out)
{
	struct row r;
	unsigned gid;
	for (const char *pos = text; next_row(&pos, &r);) {
		if (r.n < GROUP_COLS || parse_id(r.col[2], &gid) < 0 || gid == out->gid ||
		    !lists(r.col[3], user))
			continue;
		int seen = 0;
		for (size_t i = 0; i < out->ngroups; i++)
			seen |= out->groups[i] == gid;
		if (!seen && out->ngroups < MAX_USER_GROUPS)
			out->groups[out->ngroups++] = gid;
	}
}

int resolve_user(const char *spec, const char *passwd, const char *group, struct user_ids *out,
		 char *err, size_t errlen)
{
	char user[NAME_MAX_LEN];
	const char *colon = strchr(spec, ':');
	size_t ulen = colon ? (size_t)(colon - spec) : strlen(spec);
	const char *gpart = colon ? colon + 1 : "";
	memset(out, 0, sizeof *out);
	if (!ulen || ulen >= sizeof user) {
		snprintf(err, errlen, "bad user %.64s", spec);
		return -1;
	}
	memcpy(user, spec, ulen);
	user[ulen] = '\0';
	struct row r;
	int found;
	if (parse_uint(user, &(unsigned long long){0}) == 0) {
		if (parse_id(user, &out->uid) < 0) {
			snprintf(err, errlen, "uid %.32s is out of range", user);
			return -1;
		}
		found = passwd && find_passwd(passwd, NULL, out->uid, 1, &r);
	} else {
		found = passwd && find_passwd(passwd, user, 0, 0, &r);
		if (!found) {
			snprintf(err, errlen, "user %.64s is not in /etc/passwd", user);
			return -1;
		}
		parse_id(r.col[2], &out->uid);
	}
	if (found) {
		parse_id(r.col[3], &out->gid);
		snprintf(out->home, sizeof out->home, "%s", r.col[5][0] ? r.col[5] : "/");
	} else {
		snprintf(out->home, sizeof out->home, "/");
	}
	if (gpart[0] && parse_uint(gpart, &(unsigned long long){0}) == 0) {
		if (parse_id(gpart, &out->gid) < 0) {
			snprintf(err, errlen, "gid %.32s is out of range", gpart);
			return -1;
		}
	} else if (gpart[0] && !(group && find_group(group, gpart, &out->gid))) {
		snprintf(err, errlen, "group %.64s is not in /etc/group", gpart);
		return -1;
	}
	if (found && group)
		supplementary(group, r.col[0], out);
	return 0;
}
