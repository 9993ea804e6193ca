/* Run-time users (`vmimg run -u`, `vmimg exec -u`): "name", "uid",
 * "name:group" or "uid:gid" looked up in the guest's /etc/passwd and
 * /etc/group, by the rules vmimg/guest/agent.py's resolve_user applies at
 * build time (those of runc): a name must exist, a number need not (gid 0
 * and HOME=/ then); supplementary groups are the groups that list the user. */
#ifndef VMIMG_USERS_H
#define VMIMG_USERS_H

#include <stddef.h>

#define MAX_USER_GROUPS 64
#define HOME_MAX 256

struct user_ids {
	unsigned uid, gid;
	unsigned groups[MAX_USER_GROUPS];
	size_t ngroups;
	char home[HOME_MAX];
};

/* Resolve `spec` against the texts of /etc/passwd and /etc/group (either may
 * be NULL: no entries). Returns 0, or -1 with a one-line reason in err. */
int resolve_user(const char *spec, const char *passwd, const char *group, struct user_ids *out,
		 char *err, size_t errlen);

#endif
