/* The tree manifest parser. */
#include <stdlib.h>

#include "check.h"
#include "manifest.h"

#define SHA_A "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

static int parse(const char *text, struct manifest *m, char *err)
{
	return manifest_parse(strdup(text), m, err, 256);
}

int main(void)
{
	struct manifest m;
	char err[256];
	CHECK(parse("vmimg-manifest 1\n"
		    "/ d 0755 0 0 0 0:0 - -\n"
		    "/usr/bin/x f 4755 0 0 0 0:0 " SHA_A " -\n"
		    "/usr d 0755 0 0 0 0:0 - -\n"
		    "/dev/null c 0666 0 0 0 1:3 - -\n"
		    "/a%20b l 0777 10 20 6 0:0 - ../%25x\n"
		    "/fifo p 0600 1 1 0 0:0 - -\n"
		    "/usr/bin d 0755 0 0 0 0:0 - -\n",
		    &m, err) == 0);
	CHECK(m.n == 7);
	/* sorted by path bytes */
	CHECK_STR(m.entries[0].path, "/");
	CHECK_STR(m.entries[1].path, "/a b");
	for (size_t i = 1; i < m.n; i++)
		CHECK(strcmp(m.entries[i - 1].path, m.entries[i].path) < 0);
	const struct manifest_entry *e = manifest_find(&m, "/usr/bin/x");
	CHECK(e && e->type == MT_FILE && e->mode == 04755 && e->size == 0);
	CHECK(e && e->sha256 && !strcmp(e->sha256, SHA_A));
	e = manifest_find(&m, "/a b");
	CHECK(e && e->type == MT_SYMLINK && e->uid == 10 && e->gid == 20 && e->size == 6);
	CHECK(e && e->target && !strcmp(e->target, "../%x"));
	CHECK(e && e->sha256 == NULL);
	e = manifest_find(&m, "/dev/null");
	CHECK(e && e->type == MT_CHAR && e->rmajor == 1 && e->rminor == 3);
	CHECK(manifest_find(&m, "/nope") == NULL);
	CHECK(manifest_find(&m, "/usr/bin")->type == MT_DIR);
	manifest_free(&m);

	/* a symlink whose target is "-" is not confused with "no target" */
	CHECK(parse("vmimg-manifest 1\n/l l 0777 0 0 1 0:0 - -\n", &m, err) == 0);
	CHECK(m.n == 1 && !strcmp(m.entries[0].target, "-"));
	manifest_free(&m);

	CHECK(parse("vmimg-manifest 2\n", &m, err) == -1 && strstr(err, "version"));
	CHECK(parse("vmimg-manifest 1\n/ d 0755 0 0 0 0:0 -\n", &m, err) == -1 &&
	      strstr(err, "line 2") && strstr(err, "fields"));
	CHECK(parse("vmimg-manifest 1\n/ d 0755 0 0 0 0:0 - - extra\n", &m, err) == -1);
	CHECK(parse("vmimg-manifest 1\nrel d 0755 0 0 0 0:0 - -\n", &m, err) == -1 &&
	      strstr(err, "path"));
	CHECK(parse("vmimg-manifest 1\n/x q 0755 0 0 0 0:0 - -\n", &m, err) == -1 &&
	      strstr(err, "type"));
	CHECK(parse("vmimg-manifest 1\n/x d 0855 0 0 0 0:0 - -\n", &m, err) == -1 &&
	      strstr(err, "mode"));
	CHECK(parse("vmimg-manifest 1\n/x f 0644 0 0 0 0:0 abc -\n", &m, err) == -1 &&
	      strstr(err, "sha256"));
	CHECK(parse("vmimg-manifest 1\n/x c 0644 0 0 0 13 - -\n", &m, err) == -1 &&
	      strstr(err, "rdev"));
	CHECK(parse("vmimg-manifest 1\n\n/x d 0755 0 0 0 0:0 - -\n", &m, err) == 0 && m.n == 1);
	manifest_free(&m);
	/* one line per path */
	CHECK(parse("vmimg-manifest 1\n/a d 0755 0 0 0 0:0 - -\n/b d 0755 0 0 0 0:0 - -\n"
		    "/a d 0700 0 0 0 0:0 - -\n",
		    &m, err) == -1 &&
	      strstr(err, "/a twice"));
	/* no entries at all: nothing to sort or find */
	CHECK(parse("vmimg-manifest 1\n", &m, err) == 0 && m.n == 0 && !manifest_find(&m, "/"));
	return check_done("manifest");
}
