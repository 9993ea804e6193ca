/* The agent config parser. */
#include <stdlib.h>

#include "check.h"
#include "config.h"

static int parse(const char *text, struct config *cfg, char *err)
{
	char *copy = strdup(text); /* leaked on purpose: cfg points into it */
	return config_parse(copy, cfg, err, 256);
}

int main(void)
{
	struct config c;
	char err[256];

	CHECK(parse("vmimg-agent-config 1\n"
		    "arg /bin/echo\n"
		    "arg hello%20world\n"
		    "arg\n"
		    "arg %25%0A\n"
		    "env PATH=/bin\n"
		    "env A=b%3Dc\n"
		    "cwd /srv/app\n"
		    "uid 1000\n"
		    "gid 100\n"
		    "group 10\n"
		    "group 20\n"
		    "hostname box\n"
		    "overlay always\n"
		    "smoke true\n"
		    "stop_timeout 3\n"
		    "stop_signal 3\n"
		    "some_future_key whatever\n"
		    "# a comment\n",
		    &c, err) == 0);
	CHECK(c.argc == 4);
	CHECK(c.stop_signal == 3);
	CHECK_STR(c.argv[0], "/bin/echo");
	CHECK_STR(c.argv[1], "hello world");
	CHECK_STR(c.argv[2], "");
	CHECK_STR(c.argv[3], "%\n");
	CHECK(c.argv[4] == NULL);
	CHECK(c.envc == 2);
	CHECK_STR(c.envp[1], "A=b=c");
	CHECK(c.envp[2] == NULL);
	CHECK_STR(c.cwd, "/srv/app");
	CHECK(c.uid == 1000 && c.gid == 100);
	CHECK(c.ngroups == 2 && c.groups[0] == 10 && c.groups[1] == 20);
	CHECK_STR(c.hostname, "box");
	CHECK(c.overlay == OVERLAY_ALWAYS);
	CHECK_STR(c.smoke, "true");
	CHECK(c.stop_timeout == 3);
	config_free(&c);

	/* defaults, and no trailing newline */
	CHECK(parse("vmimg-agent-config 1\narg sh", &c, err) == 0);
	CHECK_STR(c.cwd, "/");
	CHECK(c.uid == 0 && c.gid == 0 && c.ngroups == 0);
	CHECK(c.hostname == NULL && c.smoke == NULL);
	CHECK(c.overlay == OVERLAY_AUTO);
	CHECK(c.stop_timeout == DEFAULT_STOP_TIMEOUT_S);
	CHECK(c.envc == 1 && !strncmp(c.envp[0], "PATH=", 5));
	config_free(&c);

	/* errors name what is wrong */
	CHECK(parse("", &c, err) == -1 && strstr(err, "not a vmimg agent config"));
	CHECK(parse("vmimg-agent-config 2\narg x\n", &c, err) == -1 && strstr(err, "version"));
	CHECK(parse("vmimg-agent-config 1\n", &c, err) == -1 && strstr(err, "no command"));
	CHECK(parse("vmimg-agent-config 1\narg a%2\n", &c, err) == -1 && strstr(err, "line 2"));
	CHECK(parse("vmimg-agent-config 1\narg a\nuid -5\n", &c, err) == -1 &&
	      strstr(err, "line 3") && strstr(err, "uid"));
	CHECK(parse("vmimg-agent-config 1\narg a\nenv NOEQUALS\n", &c, err) == -1);
	CHECK(parse("vmimg-agent-config 1\narg a\ncwd relative\n", &c, err) == -1);
	CHECK(parse("vmimg-agent-config 1\narg a\noverlay sometimes\n", &c, err) == -1);
	CHECK(parse("vmimg-agent-config 1\narg a\narg b%00\n", &c, err) == -1);
	/* STOPSIGNAL: a Linux signal number, SIGTERM when absent */
	CHECK(parse("vmimg-agent-config 1\narg x\nstop_signal 0\n", &c, err) < 0);
	CHECK(parse("vmimg-agent-config 1\narg x\nstop_signal 65\n", &c, err) < 0);
	CHECK(parse("vmimg-agent-config 1\narg x\n", &c, err) == 0 && c.stop_signal == 15);

	/* A bad group after good ones (a gid from /etc/group too big for a gid_t)
	 * is an error that frees the groups once (ASan: no double free, no leak). */
	CHECK(parse("vmimg-agent-config 1\narg x\ngroup 1\ngroup 2\ngroup 99999999999\n", &c,
		    err) == -1 &&
	      strstr(err, "line 5") && strstr(err, "group"));
	CHECK(c.groups == NULL && c.ngroups == 0);
	CHECK(parse("vmimg-agent-config 1\narg x\ngroup 7\ngroup x\n", &c, err) == -1);
	/* ids run 0..2^32-2: 2^32-1 is (uid_t)-1, which set*id() read as "unchanged" */
	CHECK(parse("vmimg-agent-config 1\narg x\ngroup 4294967294\nuid 4294967294\n", &c, err) ==
		      0 &&
	      c.groups[0] == 4294967294u && c.uid == 4294967294u);
	config_free(&c);
	CHECK(parse("vmimg-agent-config 1\narg x\ngroup 4294967295\n", &c, err) == -1);
	CHECK(parse("vmimg-agent-config 1\narg x\ngid 4294967295\n", &c, err) == -1);
	CHECK(parse("vmimg-agent-config 1\narg x\nuid 18446744073709551616\n", &c, err) == -1);
	return check_done("config");
}
