/* The run config parser, its merge into the config, and run-time users. */
#include <stdlib.h>

#include "check.h"
#include "config.h"
#include "runcfg.h"
#include "users.h"

#define HEAD "vmimg-run-config 1\n"

static int parse(const char *text, struct runcfg *rc, char *err)
{
	char *copy = strdup(text); /* leaked on purpose: rc points into it */
	return runcfg_parse(copy, rc, err, 256);
}

static const char passwd[] = "root:x:0:0:root:/root:/bin/sh\n"
			     "app:x:1000:1000:App:/home/app:/bin/sh\n"
			     "odd line\n"
			     "nohome:x:1001:1001:::/bin/sh\n";
static const char group[] = "root:x:0:\n"
			    "wheel:x:10:app,root\n"
			    "audio:x:29:nohome,app\n"
			    "app:x:1000:\n"
			    "staff:x:50:\n";

static void test_users(void)
{
	struct user_ids u;
	char err[256];
	CHECK(resolve_user("app", passwd, group, &u, err, sizeof err) == 0);
	CHECK(u.uid == 1000 && u.gid == 1000 && u.ngroups == 2);
	CHECK(u.groups[0] == 10 && u.groups[1] == 29);
	CHECK_STR(u.home, "/home/app");
	CHECK(resolve_user("1000:staff", passwd, group, &u, err, sizeof err) == 0);
	CHECK(u.uid == 1000 && u.gid == 50 && u.ngroups == 2);
	CHECK(resolve_user("app:7", passwd, group, &u, err, sizeof err) == 0 && u.gid == 7);
	CHECK(resolve_user("4242", passwd, group, &u, err, sizeof err) == 0);
	CHECK(u.uid == 4242 && u.gid == 0 && u.ngroups == 0);
	CHECK_STR(u.home, "/");
	CHECK(resolve_user("nohome", passwd, group, &u, err, sizeof err) == 0);
	CHECK_STR(u.home, "/");
	CHECK(u.ngroups == 1 && u.groups[0] == 29);
	CHECK(resolve_user("4242:4243", NULL, NULL, &u, err, sizeof err) == 0 && u.gid == 4243);
	CHECK(resolve_user("ghost", passwd, group, &u, err, sizeof err) < 0 &&
	      strstr(err, "ghost"));
	CHECK(resolve_user("app:ghosts", passwd, group, &u, err, sizeof err) < 0 &&
	      strstr(err, "ghosts"));
	CHECK(resolve_user("4294967295", passwd, group, &u, err, sizeof err) < 0);
	CHECK(resolve_user("1:4294967295", passwd, group, &u, err, sizeof err) < 0);
	CHECK(resolve_user("", passwd, group, &u, err, sizeof err) < 0);
	CHECK(resolve_user(":5", passwd, group, &u, err, sizeof err) < 0);
}

int main(void)
{
	struct runcfg rc;
	char err[256];

	CHECK(parse(HEAD "arg /bin/echo\n"
			 "arg a%20b\n"
			 "arg \n"
			 "env A=1\n"
			 "env PATH=/x\n"
			 "cwd /w\n"
			 "user app:staff\n"
			 "hostname h\n"
			 "tty 0\n"
			 "stdin 1\n"
			 "rows 40\n"
			 "cols 120\n"
			 "stop_timeout 3\n"
			 "stop_signal 3\n"
			 "volume vmimg0 /mnt/my%20dir ro\n"
			 "disk vmimg-disk0 /data data\n"
			 "disk vmimg-disk1  rw\n"
			 "secret token 00ff41\n"
			 "secret empty \n"
			 "future_key x y\n"
			 "# comment\n",
		    &rc, err) == 0);
	if (rc.argc != 3) {
		fprintf(stderr, "%s\n", err);
		return check_done("runcfg");
	}
	CHECK(rc.argv[3] == NULL);
	CHECK_STR(rc.argv[1], "a b");
	CHECK_STR(rc.argv[2], "");
	CHECK(rc.envc == 2);
	CHECK_STR(rc.cwd, "/w");
	CHECK_STR(rc.user, "app:staff");
	CHECK_STR(rc.hostname, "h");
	CHECK(rc.tty == 0 && rc.stdin_open == 1 && rc.rows == 40 && rc.cols == 120);
	CHECK(rc.nmounts == 3);
	CHECK(rc.mounts[0].kind == RM_VOLUME && rc.mounts[0].mode == RM_RO);
	CHECK_STR(rc.mounts[0].target, "/mnt/my dir");
	CHECK(rc.mounts[1].kind == RM_DISK && rc.mounts[1].mode == RM_DATA);
	CHECK_STR(rc.mounts[2].target, "");
	CHECK(rc.nsecrets == 2);
	CHECK_STR(rc.secrets[0].name, "token");
	CHECK(rc.secrets[0].len == 3 && !memcmp(rc.secrets[0].data, "\x00\xff" "A", 3));
	CHECK(rc.secrets[1].len == 0);

	/* merged over a config: argv replaced, env keys replaced in place or added */
	struct config cfg;
	char *ctext = strdup("vmimg-agent-config 1\narg old\nenv PATH=/bin\nenv B=2\n");
	CHECK(config_parse(ctext, &cfg, err, sizeof err) == 0);
	CHECK(runcfg_apply(&rc, &cfg) == 0);
	CHECK(cfg.argc == 3);
	CHECK_STR(cfg.argv[0], "/bin/echo");
	CHECK(cfg.envc == 3);
	CHECK_STR(cfg.envp[0], "PATH=/x");
	CHECK_STR(cfg.envp[1], "B=2");
	CHECK_STR(cfg.envp[2], "A=1");
	CHECK(cfg.envp[3] == NULL);
	CHECK_STR(cfg.cwd, "/w");
	CHECK_STR(cfg.hostname, "h");
	CHECK(cfg.stop_timeout == 3 && cfg.stop_signal == 3);
	runcfg_free(&rc);
	CHECK(rc.nsecrets == 0 && rc.argv == NULL);
	config_free(&cfg);

	/* nothing given keeps everything */
	CHECK(parse(HEAD, &rc, err) == 0);
	CHECK(rc.argv == NULL && rc.tty == -1 && rc.stdin_open == -1 && rc.user == NULL);
	CHECK(rc.stop_timeout == -1 && rc.stop_signal == 0);
	runcfg_free(&rc);

	/* hostile lines are refused, naming the line and key but never a value */
	const char *bad[] = {
		HEAD "cwd relative\n",
		HEAD "env NOEQUALS\n",
		HEAD "env =x\n",
		HEAD "user \n",
		HEAD "tty 2\n",
		HEAD "rows 0\n",
		HEAD "cols 65536\n",
		HEAD "stop_timeout -1\n",
		HEAD "stop_timeout 4294967295\n",
		HEAD "stop_signal 0\n",
		HEAD "stop_signal 65\n",
		HEAD "volume t / ro\n",
		HEAD "volume t /a/../b ro\n",
		HEAD "volume t /a/./b ro\n",
		HEAD "volume t relative ro\n",
		HEAD "volume t /a data\n",
		HEAD "volume  /a ro\n",
		HEAD "disk s /a sometimes\n",
		HEAD "disk s /a\n",
		HEAD "secret ../x 00\n",
		HEAD "secret a/b 00\n",
		HEAD "secret .. 00\n",
		HEAD "secret x 0\n",
		HEAD "secret x 0G\n",
		HEAD "secret x 0x00\n",
		HEAD "secret x 00\nsecret x 11\n",
		HEAD "arg a b\n",
		HEAD "arg %00\n",
		HEAD "a b c d e\n",
		"vmimg-run-config 2\n",
		"vmimg-agent-config 1\narg x\n",
		"",
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		int rcode = parse(bad[i], &rc, err);
		CHECK(rcode == -1);
		if (rcode == -1 && i < 29)
			CHECK(strstr(err, "run config line ") != NULL);
		CHECK(rc.argv == NULL && rc.env == NULL && rc.nsecrets == 0);
	}
	CHECK(parse(HEAD "secret key 736563726574\n", &rc, err) == 0);
	runcfg_free(&rc);
	CHECK(parse(HEAD "secret key 7365637265zz\n", &rc, err) == -1 && !strstr(err, "7365"));
	/* a secret at the size limit passes, one byte more does not */
	size_t hex = 2 * (size_t)MAX_SECRET_BYTES;
	char *big = malloc(sizeof HEAD + 16 + hex + 4);
	for (int extra = 0; extra <= 2; extra += 2) {
		sprintf(big, HEAD "secret big ");
		size_t at = strlen(big);
		memset(big + at, 'a', hex + (size_t)extra);
		big[at + hex + (size_t)extra] = '\0';
		CHECK(runcfg_parse(big, &rc, err, sizeof err) == (extra ? -1 : 0));
		runcfg_free(&rc);
	}
	free(big);

	/* too many mounts */
	char many[MAX_RUN_MOUNTS * 32 + 64];
	strcpy(many, HEAD);
	for (int i = 0; i <= MAX_RUN_MOUNTS; i++)
		sprintf(many + strlen(many), "volume t%d /m%d rw\n", i, i);
	CHECK(parse(many, &rc, err) == -1);

	test_users();
	return check_done("runcfg");
}
