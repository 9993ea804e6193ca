/* Marker lines: one write, every field present, never past the line buffer,
 * however long a value is (a deep path in verify-problem, a long argv[0]). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"
#include "report.h"
#include "util.h"

#define LINE_MAX_BYTES 1024 /* report.c's MARKER_MAX */

/* Run marker() into a temp file and return what it wrote. */
static char *capture(const char *event, const char *k1, const char *v1, const char *k2,
		     const char *v2)
{
	FILE *f = tmpfile();
	g_console_fd = fileno(f);
	marker(event, k1, v1, k2, v2, (char *)NULL);
	long n = ftell(f);
	char *out = calloc(1, (size_t)n + 1);
	rewind(f);
	CHECK(fread(out, 1, (size_t)n, f) == (size_t)n);
	fclose(f);
	return out;
}

int main(void)
{
	char *line = capture("exit", "code", "3", "signal", "9");
	CHECK_STR(line, "\n@@vmimg@@ exit code=3 signal=9\n");
	free(line);

	/* A value far longer than a line: cut, and the fields after it still there. */
	size_t big = 5 * LINE_MAX_BYTES;
	char *path = malloc(big + 1);
	for (size_t i = 0; i < big; i += 2)
		memcpy(path + i, "/d", 2);
	path[big] = '\0';
	line = capture("verify-problem", "path", path, "what", "unexpected");
	size_t len = strlen(line);
	CHECK(len < LINE_MAX_BYTES);
	CHECK(line[len - 1] == '\n' && strchr(line + 1, '\n') == line + len - 1);
	CHECK(strstr(line, " path=/d/d/d") != NULL);
	CHECK(strstr(line, " what=unexpected\n") != NULL);
	free(line);

	/* Two long values share the line; escapes are never cut in half. */
	char *spaces = malloc(big + 1);
	memset(spaces, ' ', big);
	spaces[big] = '\0';
	line = capture("error", "stage", spaces, "msg", spaces);
	len = strlen(line);
	CHECK(len < LINE_MAX_BYTES && line[len - 1] == '\n');
	char *msg = strstr(line, " msg=%20");
	CHECK(msg != NULL);
	if (msg) {
		CHECK((strlen(msg) - strlen(" msg=") - 1) % 3 == 0);
	}
	free(line);
	free(spaces);
	free(path);
	return check_done("marker");
}
